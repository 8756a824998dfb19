"""Token files: the tokens of many images (of any sizes) in one safetensors file.

Layout: one tensor per image, ``ids.<i>`` (shape ``grid`` or ``(*grid, Q)``, stored as int16 when every
id fits, else int32) or ``latents.<i>`` (float32 ``(C, *grid)``), plus a JSON string under the
safetensors metadata key ``vtok`` that records, per item, the source name, the original image size and
the token grid, and for the file the model id, a hash of the model config, the format version and the
vocabulary. Per-image tensors because images of different sizes have different grids.

Loading checks everything a decoder would otherwise trip over (missing keys, wrong shapes, ids out of
range, grids that do not fit the size or the model) and reports it as one :class:`InputError` line
naming the file and the item.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vtok.atomic import atomic_path
from vtok.errors import InputError
from vtok.models.tokenizer import TokenizerInfo
from vtok.tokens import TokenBatch

FORMAT_NAME = "vtok.tokens"
FORMAT_VERSION = 1
META_KEY = "vtok"

_ID_DTYPES = {"int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


@dataclass
class TokenFile:
    """Contents of a token file: one :class:`TokenBatch` of batch size 1 per source image."""

    items: list[TokenBatch]
    sources: list[str]
    model: str | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def config_hash(self) -> str | None:
        """Hash of the config of the model that wrote the file (see :func:`config_hash`)."""
        return self.metadata.get("config_hash")


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a model config (name and version fields ignored) to spot model mismatches."""
    core = {k: v for k, v in config.items() if k not in ("name", "format_version", "vtok_version")}
    blob = json.dumps(core, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def id_dtype_for(info: TokenizerInfo) -> torch.dtype:
    """Smallest signed integer dtype holding every id of ``info``'s vocabulary (int16 up to 32768)."""
    largest = max([info.codebook_size, *info.sub_vocab_sizes], default=0)
    if largest <= 2**15:
        return torch.int16
    if largest <= 2**31:
        return torch.int32
    return torch.int64


def _slot_vocab(info_like: dict[str, Any]) -> list[int]:
    """Vocabulary of each id slot: sub-vocabularies when they describe the slots, else the codebook."""
    q = int(info_like["num_codebooks"])
    subs = [int(s) for s in info_like.get("sub_vocab_sizes") or []]
    if len(subs) == q and q > 0:
        return subs
    return [int(info_like["codebook_size"])] * max(q, 1)


def _info_dict(info: TokenizerInfo) -> dict[str, Any]:
    return {
        "token_kind": info.token_kind,
        "downsample": list(info.downsample),
        "continuous": info.continuous,
        "codebook_size": info.codebook_size,
        "num_codebooks": info.num_codebooks,
        "sub_vocab_sizes": list(info.sub_vocab_sizes),
        "latent_channels": info.latent_channels,
        "bits_per_token": info.bits_per_token,
    }


def save_tokens(
    path: str | os.PathLike[str],
    tokens: Sequence[TokenBatch],
    sources: Sequence[str],
    *,
    info: TokenizerInfo,
    model_id: str | None = None,
    model_config_hash: str | None = None,
) -> Path:
    """Write the tokens of ``len(sources)`` images to ``path`` (safetensors, atomically).

    ``tokens`` are :class:`TokenBatch` objects (any batch size; items are taken in order) from the
    model described by ``info``; ``sources`` names each image (a path or ``sample:NAME``).
    """
    items = [tb[i] for tb in tokens for i in range(tb.batch_size)]
    if len(items) != len(sources):
        raise InputError(f"{path}: {len(items)} token items but {len(sources)} source names")
    if not items:
        raise InputError(f"{path}: no tokens to write")
    kind = "latents" if info.continuous else "ids"
    dtype = id_dtype_for(info)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": model_id,
        "model_name": info.name,
        "config_hash": model_config_hash,
        "kind": kind,
        **_info_dict(info),
        "id_dtype": str(dtype).removeprefix("torch.") if kind == "ids" else None,
        "items": [],
    }
    tensors: dict[str, Tensor] = {}
    for i, (tb, source) in enumerate(zip(items, sources, strict=True)):
        meta["items"].append({"source": str(source), "size": list(tb.size), "grid": list(tb.grid)})
        if kind == "ids":
            if tb.ids is None:
                raise InputError(f"{path}: item {i} ({source}) has latents but the model is discrete")
            tensors[f"ids.{i}"] = tb.ids[0].detach().to("cpu", dtype).contiguous()
        else:
            if tb.latents is None:
                raise InputError(f"{path}: item {i} ({source}) has ids but the model is continuous")
            tensors[f"latents.{i}"] = tb.latents[0].detach().to("cpu", torch.float32).contiguous()
    # the writer is held to the same checks as any reader (ids in range, grids that fit)
    _validate(Path(path), meta, {k: v for k, v in tensors.items()}, info)
    from vtok import __version__

    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME, "vtok_version": __version__,
                                                META_KEY: json.dumps(meta)})
    return target


def load_tokens(path: str | os.PathLike[str], info: TokenizerInfo | None = None) -> TokenFile:
    """Read a token file; with ``info``, also check that every item can be decoded by that model.

    Ids come back as int64 ``(1, *grid[, Q])``, latents as float32 ``(1, C, *grid)``.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a token file (.safetensors)")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            keys = list(f.keys())
            meta = _parse_meta(path, header)
            kind = meta["kind"]
            wanted = [f"{kind}.{i}" for i in range(len(meta["items"]))]
            missing = [k for k in wanted if k not in keys]
            if missing:
                i = wanted.index(missing[0])
                raise InputError(
                    f"{path}: item {i} ({meta['items'][i]['source']}): tensor {missing[0]!r} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            tensors = {k: f.get_tensor(k) for k in wanted}
    except InputError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable safetensors token file ({reason})") from None
    _validate(path, meta, tensors, None)
    if info is not None:
        _validate(path, meta, tensors, info)
    items = []
    for i, item in enumerate(meta["items"]):
        t = tensors[f"{kind}.{i}"]
        if kind == "ids":
            items.append(TokenBatch(ids=t.long()[None], latents=None, grid=item["grid"], size=item["size"],
                                    model=meta.get("model")))
        else:
            items.append(TokenBatch(ids=None, latents=t.float()[None], grid=item["grid"], size=item["size"],
                                    model=meta.get("model")))
    return TokenFile(items=items, sources=[it["source"] for it in meta["items"]], model=meta.get("model"),
                     metadata=meta)


def _parse_meta(path: Path, header: dict[str, str]) -> dict[str, Any]:
    if header.get("format") != FORMAT_NAME or META_KEY not in header:
        raise InputError(f"{path}: a safetensors file but not a vtok token file (write one with `vtok encode`)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: token metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: token metadata must be a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise InputError(f"{path}: token metadata has no format_version")
    if version > FORMAT_VERSION:
        raise InputError(f"{path}: written by a newer vtok (token format {version}, this vtok reads "
                         f"{FORMAT_VERSION}); upgrade vtok")
    required = ("kind", "items", "downsample", "codebook_size", "num_codebooks", "latent_channels")
    absent = [k for k in required if k not in meta]
    if absent:
        raise InputError(f"{path}: token metadata lacks {', '.join(absent)}")
    if meta["kind"] not in ("ids", "latents"):
        raise InputError(f"{path}: token kind {meta['kind']!r} is neither 'ids' nor 'latents'")
    if not isinstance(meta["items"], list):
        raise InputError(f"{path}: token metadata 'items' must be a list")
    try:
        meta["downsample"] = [int(d) for d in meta["downsample"]]
        for k in ("codebook_size", "num_codebooks", "latent_channels"):
            meta[k] = int(meta[k])
        meta["sub_vocab_sizes"] = [int(s) for s in meta.get("sub_vocab_sizes") or []]
    except (TypeError, ValueError):
        raise InputError(f"{path}: token metadata has non-integer vocabulary or downsample fields") from None
    for i, item in enumerate(meta["items"]):
        ok = isinstance(item, dict) and isinstance(item.get("source", ""), str)
        try:
            item["size"] = [int(s) for s in item["size"]]
            item["grid"] = [int(g) for g in item["grid"]]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{path}: item {i}: metadata needs 'source', 'size' and 'grid'")
        item.setdefault("source", f"item{i}")
    return meta


def _expected_grid(size: tuple[int, ...], f: list[int], info: TokenizerInfo | None,
                   token_kind: str) -> tuple[int, ...] | None:
    """The grid a model (or, without one, the file's recorded downsampling) gives for ``size``.

    ``None`` when the file alone cannot tell (token kinds whose grid does not follow from the size).
    """
    if info is not None:
        try:
            return tuple(info.grid_for(size))
        except ValueError:
            return ()  # a size of the wrong rank fits no grid
    if token_kind not in ("2d", "3d") or len(size) != len(f):
        return None if token_kind not in ("2d", "3d") else ()
    return tuple(math.ceil(s / d) for s, d in zip(size, f, strict=True))


def _validate(path: Path, meta: dict[str, Any], tensors: dict[str, Tensor], info: TokenizerInfo | None) -> None:
    """Check every item against the file's own metadata (``info=None``) or against a model."""
    ref = meta if info is None else _info_dict(info)
    whose = "the file's" if info is None else f"model {info.name or ''}".rstrip() + "'s"
    kind = meta["kind"]
    if info is not None and (kind == "latents") != info.continuous:
        need = "continuous latents" if info.continuous else "integer ids"
        raise InputError(f"{path}: holds {kind} but this model takes {need}; decode with the model that wrote it"
                         + (f" ({meta.get('model')})" if meta.get("model") else ""))
    f = [int(d) for d in ref["downsample"]]
    slots = _slot_vocab(ref)
    q = int(ref["num_codebooks"])
    for i, item in enumerate(meta["items"]):
        where = f"{path}: item {i} ({item.get('source', '?')})"
        t = tensors[f"{kind}.{i}"]
        size, grid = tuple(item["size"]), tuple(item["grid"])
        if not size or any(s <= 0 for s in size) or not grid or any(g <= 0 for g in grid):
            raise InputError(f"{where}: size {size} / grid {grid} are not valid")
        expected_grid = _expected_grid(size, f, info, meta.get("token_kind", "2d"))
        if expected_grid == ():
            raise InputError(f"{where}: size {'x'.join(map(str, size))} has the wrong number of dimensions for "
                             f"{whose} f={'x'.join(map(str, f))}")
        if expected_grid is not None and grid != expected_grid:
            raise InputError(
                f"{where}: token grid {'x'.join(map(str, grid))} does not fit {whose} downsampling "
                f"(f={'x'.join(map(str, f))}: a {'x'.join(map(str, size))} image gives "
                f"{'x'.join(map(str, expected_grid))}); decode with the model that wrote the file"
            )
        if kind == "ids":
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise InputError(f"{where}: ids must be integers, got {t.dtype}")
            shape = grid if q == 1 else (*grid, q)
            if tuple(t.shape) != shape:
                raise InputError(f"{where}: ids have shape {tuple(t.shape)}, expected {shape} for grid {grid}"
                                 + ("" if q == 1 else f" with {q} ids per position"))
            per_slot = t.reshape(-1, q).long() if t.numel() else t.reshape(0, q).long()
            for s, vocab in enumerate(slots):
                col = per_slot[:, s]
                if col.numel() and (int(col.min()) < 0 or int(col.max()) >= vocab):
                    slot = f" (slot {s})" if q > 1 else ""
                    raise InputError(
                        f"{where}: token ids{slot} span [{int(col.min())}, {int(col.max())}] but {whose} "
                        f"vocabulary has {vocab} entries (0..{vocab - 1})"
                    )
        else:
            if not t.is_floating_point():
                raise InputError(f"{where}: latents must be floats, got {t.dtype}")
            shape = (int(ref["latent_channels"]), *grid)
            if tuple(t.shape) != shape:
                raise InputError(f"{where}: latents have shape {tuple(t.shape)}, expected {shape}")
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"{where}: latents contain NaN or infinity")
