"""The quantizer interface every family implements, plus the registry that builds them from config.

A quantizer maps a channels-first latent ``z`` of shape ``(B, C, *spatial)`` to a quantized latent of the
same layout (``spatial`` is ``(h, w)`` for images, ``(n,)`` for 1D tokens, ``(t, h, w)`` for video) and to
integer indices. Index layout: ``(B, *spatial)`` when one id describes a position, ``(B, *spatial, Q)``
when ``Q = num_codebooks > 1`` ids do (residual levels, groups). Continuous quantizers (KL) return no
indices.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vtok.errors import ConfigError


@dataclass
class QuantizerOutput:
    """What one quantizer call produces.

    ``losses`` holds named, already-weighted scalar terms (e.g. ``commitment`` with its β applied);
    their sum is :attr:`loss`. ``stats`` holds detached diagnostics (``usage``, ``perplexity``, ...).
    """

    quantized: Tensor
    indices: Tensor | None
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        """Sum of all loss terms (a zero scalar when there are none)."""
        if not self.losses:
            return self.quantized.new_zeros(())
        return torch.stack([v.float() for v in self.losses.values()]).sum()


class Quantizer(nn.Module):
    """Base class: subclasses set the attributes below and implement ``forward``/``indices_to_codes``.

    Constructor keyword arguments are recorded automatically, so :meth:`get_config` rebuilds the same
    quantizer through :func:`build_quantizer` without each family writing its own serialiser.
    """

    type_name: ClassVar[str] = ""
    continuous: ClassVar[bool] = False

    in_channels: int
    out_channels: int
    codebook_size: int = 0  # distinct values one index slot can take (0 for continuous)
    num_codebooks: int = 1  # index slots per position (last index axis when > 1)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Quantizer, *args: Any, **kw: Any) -> None:
            if "_config_args" not in self.__dict__:  # the outermost class records its own arguments
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                args_ = {k: v for k, v in bound.arguments.items() if k != "self"}
                if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
                    extra = {k: args_.pop(k) for k in [p.name for p in signature.parameters.values()
                                                       if p.kind == p.VAR_KEYWORD]}
                    for v in extra.values():
                        args_.update(v)
                object.__setattr__(self, "_config_args", _jsonable(args_))
            init(self, *args, **kw)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    # --- interface -------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Map integer indices back to the quantized latent ``(B, out_channels, *spatial)`` exactly."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete indices")

    # --- declared properties ---------------------------------------------------------------------
    @property
    def bits_per_token(self) -> float:
        """Information per spatial position: ``num_codebooks * log2(codebook_size)``."""
        if self.continuous or self.codebook_size <= 0:
            return 0.0
        return self.num_codebooks * math.log2(self.codebook_size)

    @property
    def sub_vocab_sizes(self) -> tuple[int, ...]:
        """Vocabulary of each index slot (one entry per codebook); factorised families override."""
        if self.continuous:
            return ()
        return (self.codebook_size,) * self.num_codebooks

    def get_config(self) -> dict[str, Any]:
        """JSON-ready dict that :func:`build_quantizer` turns back into an identical module."""
        return {"type": self.type_name, **self.__dict__.get("_config_args", {})}

    def index_shape(self, batch: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the index tensor for ``batch`` items over a latent grid ``spatial``."""
        return (batch, *spatial) if self.num_codebooks == 1 else (batch, *spatial, self.num_codebooks)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise ConfigError(f"quantizer argument {value!r} is not JSON-serialisable; pass plain values")


# --- registry ------------------------------------------------------------------------------------
# type name -> "module:Class". Modules are imported lazily so a broken optional family never blocks
# the others, and adding a family is one line here plus its own file.
QUANTIZERS: dict[str, str] = {
    "vq": "vtok.quantizers.vq:VectorQuantizer",
    "fsq": "vtok.quantizers.fsq:FSQ",
    "lfq": "vtok.quantizers.lfq:LFQ",
    "bsq": "vtok.quantizers.bsq:BSQ",
    "ibq": "vtok.quantizers.ibq:IBQ",
    "residual": "vtok.quantizers.residual:ResidualQuantizer",
    "grouped": "vtok.quantizers.grouped:GroupedQuantizer",
    "kl": "vtok.quantizers.kl:DiagonalGaussian",
}


def quantizer_class(type_name: str) -> type[Quantizer]:
    """The class registered under ``type_name``."""
    if type_name not in QUANTIZERS:
        raise ConfigError(
            f"unknown quantizer type {type_name!r}; choose one of: {', '.join(sorted(QUANTIZERS))}"
        )
    module_name, cls_name = QUANTIZERS[type_name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_quantizer(config: dict[str, Any]) -> Quantizer:
    """Build a quantizer from ``{"type": name, **kwargs}`` (the output of :meth:`Quantizer.get_config`)."""
    config = dict(config)
    type_name = config.pop("type", None)
    if type_name is None:
        raise ConfigError("quantizer config needs a 'type' key")
    cls = quantizer_class(type_name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(config) - set(params) - {"self"})
        if unknown:
            raise ConfigError(
                f"quantizer {type_name!r} got unknown option(s) {unknown}; "
                f"valid: {sorted(k for k in params if k != 'self')}"
            )
    return cls(**config)


# --- shared helpers ------------------------------------------------------------------------------
def check_composable(base: Quantizer, owner: str) -> None:
    """Residual and grouped stacks need a discrete base with one index per position."""
    if base.continuous:
        raise ConfigError(f"{owner}: base quantizer {base.type_name!r} is continuous; use a discrete one")
    if base.num_codebooks != 1:
        raise ConfigError(
            f"{owner}: base quantizer {base.type_name!r} has {base.num_codebooks} index slots; "
            "use a base with one index per position"
        )


def to_rows(z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(B, C, *S)`` -> ``(B*prod(S), C)`` rows plus the ``(B, *S)`` shape to restore them."""
    if z.dim() < 2:
        raise ValueError(f"expected a latent of shape (B, C, *spatial), got {tuple(z.shape)}")
    b, c, *spatial = z.shape
    rows = z.movedim(1, -1).reshape(-1, c)
    return rows, (b, *spatial)


def from_rows(rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`to_rows`: ``(N, C)`` -> ``(B, C, *S)``."""
    return rows.reshape(*shape, rows.shape[-1]).movedim(-1, 1)


@torch.no_grad()
def codebook_stats(indices: Tensor, codebook_size: int, num_codebooks: int = 1) -> dict[str, Tensor]:
    """Batch usage (fraction of codes hit) and perplexity (exp of the id histogram's entropy).

    With a trailing codebook axis (``num_codebooks > 1``) both are averaged over codebooks. Only the ids
    that occur are counted, so memory follows the batch, not the codebook (2^18 codes or 2^32 alike).
    """
    idx = indices.reshape(-1, num_codebooks)
    if idx.numel() == 0:
        zero = torch.zeros((), device=indices.device)
        return {"usage": zero, "perplexity": zero}
    usages, perplexities = [], []
    for q in range(idx.shape[1]):
        counts = torch.unique(idx[:, q], return_counts=True)[1].float()
        p = counts / counts.sum()
        usages.append(torch.tensor(counts.numel() / codebook_size, device=indices.device))
        perplexities.append((-(p * p.log()).sum()).exp())
    return {"usage": torch.stack(usages).mean(), "perplexity": torch.stack(perplexities).mean()}
