"""Training images streamed from tar shards in the webdataset layout (``shards:PATTERN``).

Layout (the one webdataset's ``TarWriter`` writes): a sample is a run of consecutive tar members that
share a key — the member path up to the first dot of its file name (``train/0001.jpg`` and
``train/0001.json`` form sample ``train/0001``). vtok uses the first member of each sample whose name
ends in an image extension and ignores the rest (labels, captions). Shards may be plain or compressed
tars (``.tar``, ``.tar.gz``, …); their names come from brace patterns (``data/train-{000..099}.tar``,
``{a,b}``) and/or globs (``data/*.tar``).

Read with the standard library's ``tarfile`` rather than the ``webdataset`` package: vtok needs the
order of samples to be a pure function of the seed (bit-identical resume, worker- and rank-invariant
batches), which means owning the shard order, the rank split and the worker split — exactly the parts
webdataset would otherwise provide — and ``tarfile`` lets a reader step over samples it does not need
by reading their 512-byte headers and seeking past the data, which makes resuming cheap.

The stream: every epoch visits all shards in an order drawn from ``(seed, epoch)`` and reads each
shard front to back, so samples get consecutive stream positions ``q = 0, 1, 2, …`` across epochs.
Sample ``q`` belongs to micro-batch ``q // (world_size * batch_size)``, rank
``(q // batch_size) % world_size`` — the same position formula the folder sources use, so rank ``r``'s
batches concatenated over ranks equal the batch of one process with ``world_size * batch_size``.
Within a shard, samples keep their written order: write shards from a shuffled list (as webdataset
advises) so that neighbouring samples are unrelated.

An entry that cannot be decoded is counted and replaced by the next decodable sample in the stream
(whoever owns it), cropped with the RNG of the replaced position; that keeps every batch a pure
function of ``(seed, data)``. Cost of resuming at micro-batch ``t``: the ``t * world_size *
batch_size`` earlier positions are walked header by header without decoding pixels — for plain tars
on a local disk that is one small read per member; compressed tars must be decompressed up to that
point. Shards whose sample count is already known (every shard after the first epoch) are skipped
whole.
"""

from __future__ import annotations

import glob
import io
import os
import posixpath
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vtok.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SUPPORTED_FORMATS,
    _apply_exif,
    _rawmode,
    _to_rgb_array,
)
from vtok.errors import InputError

SHARDS_PREFIX = "shards:"
_SALT_SHARD_ORDER = 0x5A4D  # keeps the shard-order RNG stream apart from the crop RNG streams
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")

Skip = tuple[str, str]  # (what, "kind: detail")


# --- shard names ---------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{000..003}`` (zero padding kept), ``{a,b}``, nested, several groups.

    Braces holding neither a comma nor a ``..`` range are left as they are.
    """
    depth, start = 0, -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                options = _brace_options(body)
                if options is None:
                    return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
                return [out for option in options for out in expand_braces(head + option + tail)]
    return [pattern]


def _brace_options(body: str) -> list[str] | None:
    match = _RANGE.match(body)
    if match:
        a_text, b_text = match.groups()
        a, b = int(a_text), int(b_text)
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (a_text, b_text))
        width = max(len(a_text), len(b_text)) if padded else 0
        step = 1 if b >= a else -1
        return [str(v).zfill(width) for v in range(a, b + step, step)]
    parts, depth, current = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        current += ch
    parts.append(current)
    return parts if len(parts) > 1 else None


def expand_pattern(pattern: str, field: str = "data.train") -> list[Path]:
    """Shard files named by ``pattern`` (braces first, then globs), in pattern order, without duplicates.

    A brace-expanded name that does not exist, or a glob that matches nothing, is an error: a silently
    missing shard would change what the run trains on.
    """
    files: list[Path] = []
    seen: set[str] = set()
    missing: list[str] = []
    for name in expand_braces(os.path.expanduser(pattern)):
        if glob.has_magic(name):
            matches = sorted(glob.glob(name, recursive=True))
            if not matches:
                missing.append(name)
        else:
            matches = [name] if Path(name).exists() else []
            if not matches:
                missing.append(name)
        for m in matches:
            if m not in seen and not Path(m).is_dir():
                seen.add(m)
                files.append(Path(m))
    if missing:
        raise InputError(
            f"{field}: {SHARDS_PREFIX}{pattern}: {len(missing)} shard name(s) match no file, e.g. {missing[0]}"
        )
    if not files:
        raise InputError(f"{field}: {SHARDS_PREFIX}{pattern}: matches no shard files")
    return files


# --- decoding ------------------------------------------------------------------------------------
def decode_image_bytes(data: bytes, min_size: int = 1, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """Decode an encoded image (PNG, JPEG, …) to float32 RGB ``(3, H, W)`` in [0, 1].

    Same conversions as :func:`vtok.data.load_image` (grayscale/palette → RGB, alpha on white, 16-bit
    scaled, EXIF orientation). Raises :class:`InputError` with a ``"kind: detail"`` reason.
    """
    if not data:
        raise InputError("empty: 0 bytes")
    Image.init()
    formats = [f for f in SUPPORTED_FORMATS if f in Image.OPEN]
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise InputError(f"too large: {width}x{height} is over the {max_pixels / 1e6:g} MP limit")
                if min(width, height) < min_size:
                    raise InputError(f"too small: {width}x{height}, data.min_size is {min_size}")
                rawmode = _rawmode(img)
                img.load()
                img = _apply_exif(img, notes)
                array = _to_rgb_array(img, rawmode, notes)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("not an image: Pillow does not recognise the contents") from None
    except Image.DecompressionBombError:
        raise InputError("too large: over Pillow's decompression-bomb limit") from None
    except MemoryError:
        raise InputError("too large: not enough memory to decode") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as e:
        raise InputError(f"unreadable: {str(e).strip() or type(e).__name__}") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))


def _split_key(name: str) -> tuple[str, str]:
    """``"dir/abc.seg.png"`` → (``"dir/abc"``, ``"abc.seg.png"``): the webdataset sample key and base name."""
    folder, base = posixpath.split(name)
    stem = base.split(".", 1)[0]
    return (f"{folder}/{stem}" if folder else stem), base


# --- the source ----------------------------------------------------------------------------------
class ShardSource:
    """The shards named by ``pattern``, read as an endless, seed-ordered stream of image samples.

    ``events`` collects shard-level problems (a shard that cannot be opened or breaks off part-way) as
    ``(shard, reason)``; the batch assembler drains it into its skip reports.
    """

    def __init__(
        self,
        pattern: str,
        min_size: int = 16,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        field: str = "data.train",
    ) -> None:
        self.pattern = pattern
        self.field = field
        self.min_size = int(min_size)
        self.max_pixels = max_pixels
        self.files = expand_pattern(pattern, field)
        self.skipped: list[Skip] = []  # nothing is known to be bad before reading
        self.found = 0
        self.events: list[Skip] = []
        self._counts: dict[int, int] = {}  # samples per shard, learned while reading

    def describe(self) -> str:
        return f"{SHARDS_PREFIX}{self.pattern} ({len(self.files)} shard files)"

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """The shard visiting order of ``epoch`` (a permutation drawn from ``(seed, epoch)``)."""
        rng = np.random.default_rng([_SALT_SHARD_ORDER, _seed64(seed), epoch])
        return [int(i) for i in rng.permutation(len(self.files))]

    def samples(self, index: int) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """``(label, read)`` for each image sample of shard ``index``, in written order.

        ``read()`` returns the image bytes and must be called before the next item is requested (the
        tar is read as a stream). A shard that cannot be read, or breaks off, is reported in ``events``
        and ends early, keeping the samples before the damage.
        """
        path = self.files[index]
        count = 0
        last_key: str | None = None
        try:
            with tarfile.open(path, mode="r:*") as tar:
                while True:
                    try:
                        member = tar.next()
                    except (tarfile.TarError, OSError, EOFError) as e:
                        self.events.append((str(path), f"bad shard: stops at sample {count} ({_reason(e)})"))
                        break
                    if member is None:
                        break
                    tar.members = []  # tarfile keeps every header otherwise; a shard may hold millions
                    if not member.isfile():
                        continue
                    key, base = _split_key(member.name)
                    if key == last_key or base.startswith("."):
                        continue
                    if Path(base).suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    last_key = key
                    count += 1
                    yield f"{path}:{member.name}", _reader(tar, member)
        except (tarfile.TarError, OSError, EOFError) as e:
            self.events.append((str(path), f"bad shard: cannot open ({_reason(e)})"))
        self._counts[index] = count

    def stream(self, seed: int, skip_before: int = 0) -> Iterator[tuple[int, int, str, Callable[[], bytes]]]:
        """``(position, epoch, label, read)`` for every sample, epoch after epoch, forever.

        Positions below ``skip_before`` are never going to be read; shards lying entirely below it are
        passed over without opening when their size is already known.
        """
        position, epoch = 0, 0
        while True:
            epoch_start = position
            for index in self.epoch_order(seed, epoch):
                known = self._counts.get(index)
                if known is not None and position + known <= skip_before:
                    position += known
                    continue
                for label, read in self.samples(index):
                    yield position, epoch, label, read
                    position += 1
            if position == epoch_start:
                raise InputError(
                    f"{self.field}: {SHARDS_PREFIX}{self.pattern}: no image entries in its "
                    f"{len(self.files)} shard files (image names end in {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            epoch += 1

    def first_images(self) -> Iterator[tuple[str, Tensor | None, str]]:
        """``(label, image or None, reason)`` for each sample in pattern order, one pass, no shuffling."""
        for index in range(len(self.files)):
            for label, read in self.samples(index):
                try:
                    yield label, decode_image_bytes(read(), self.min_size, self.max_pixels), ""
                except InputError as e:
                    yield label, None, str(e)


def _reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            handle = tar.extractfile(member)
            return handle.read() if handle is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InputError(f"unreadable: {_reason(e)}") from None

    return read


def _reason(e: BaseException) -> str:
    return str(e).strip() or type(e).__name__


def _seed64(seed: int) -> int:
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


# --- micro-batches -------------------------------------------------------------------------------
def stream_batches(
    source: ShardSource,
    transform: Callable[[Tensor, np.random.Generator], Tensor],
    sample_rng: Callable[[int], np.random.Generator],
    batch_size: int,
    rank: int,
    world_size: int,
    first: int,
    every: int = 1,
    seed: int = 0,
) -> Iterator[tuple[int, Tensor, list[Skip], int]]:
    """Micro-batches ``first, first + every, …`` of this rank: ``(t, images, skips, substituted)``.

    ``sample_rng(q)`` is the crop RNG of stream position ``q``. ``every`` > 1 lets DataLoader worker
    ``w`` of ``k`` produce batches ``first + w, first + w + k, …`` from its own reader.
    """
    per_batch = world_size * batch_size

    def batch_of(q: int) -> int | None:
        """The micro-batch of this worker that position ``q`` belongs to, if any."""
        t, offset = divmod(q, per_batch)
        if offset // batch_size != rank or t < first or (t - first) % every:
            return None
        return t

    next_t = first
    open_batches: dict[int, dict[int, Tensor]] = {}
    substituted: dict[int, int] = {}
    pending: list[tuple[int, int]] = []  # (batch, position) waiting for the next decodable sample
    pending_epoch = 0
    skips: list[Skip] = []
    for q, epoch, label, read in source.stream(seed, skip_before=first * per_batch + rank * batch_size):
        if source.events:
            skips.extend(source.events)
            source.events.clear()
        t = batch_of(q)
        if t is None and not pending:
            continue
        try:
            image = decode_image_bytes(read(), source.min_size, source.max_pixels)
        except InputError as e:
            skips.append((label, str(e)))
            if t is not None:
                if not pending:
                    pending_epoch = epoch
                pending.append((t, q))
            if pending and epoch > pending_epoch + 1:
                raise InputError(
                    f"{source.field}: {SHARDS_PREFIX}{source.pattern}: no decodable image in a whole epoch"
                ) from None
            continue
        for tp, p in pending:
            open_batches.setdefault(tp, {})[p] = transform(image, sample_rng(p))
            substituted[tp] = substituted.get(tp, 0) + 1
        pending = []
        if t is not None:
            open_batches.setdefault(t, {})[q] = transform(image, sample_rng(q))
        while len(open_batches.get(next_t, ())) == batch_size:
            slots = open_batches.pop(next_t)
            lo = next_t * per_batch + rank * batch_size
            yield next_t, torch.stack([slots[p] for p in range(lo, lo + batch_size)]), skips, substituted.pop(next_t, 0)
            skips = []
            next_t += every
