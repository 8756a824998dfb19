"""What the trainer calls for data: :func:`train_batches`, :func:`validation_images` and :class:`DataStats`.

Determinism contract. The micro-batch that rank ``r`` trains on at optimizer step ``s``, micro-step
``m`` depends only on ``(seed, s, m, r, world_size, data config, the data itself)``: not on the number
of loader workers, not on when the run started or resumed. Every sample has a global position

    p = ((t * world_size + r) * batch_size + j),   t = s * accumulate + m,   j = 0 … batch_size - 1

and everything about it is derived from ``(seed, p)``:

* folder and built-in sources (indexable, ``n`` images): epoch ``p // n`` visits the images in a
  permutation drawn from ``(seed, epoch)``; sample ``p`` is image ``perm[p % n]``. An image that turns
  out unreadable at load time is replaced by the next one in that permutation, and counted.
* shard streams: sample ``p`` is the ``p``-th image of the seed-ordered stream (see
  :mod:`vtok.data.shards`).
* the crop and flip of sample ``p`` use ``numpy.random.default_rng([salt, seed, p])``.

Hence resuming at ``start_step`` reproduces exactly the batches of an uninterrupted run, and the
per-rank batches of a ``world_size``-process run, concatenated in rank order, are the batches of one
process with ``batch_size * world_size``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from vtok.data.builtin import BUILTIN_PREFIX, BuiltinPhotos
from vtok.data.folder import ImageFolder
from vtok.data.shards import SHARDS_PREFIX, ShardSource, Skip, stream_batches
from vtok.data.transforms import TrainTransform, center_box, crop, resize
from vtok.errors import ConfigError, InputError

_SALT_SAMPLE = 0x7C0  # crop/flip RNG of a training sample
_SALT_EPOCH = 0x7C1  # image permutation of an epoch
_SALT_VAL = 0x7C2  # extra validation crops (seed-independent)

MapSource = ImageFolder | BuiltinPhotos


# --- configuration -------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """The ``data:`` section of the training config: the one schema for it (vtok.train.config uses it)."""

    train: str = "builtin:photos"
    val: str | None = "builtin:photos-val"
    size: int = 64
    crop: str = "random_resized"
    min_scale: float = 0.35
    max_scale: float = 1.0
    hflip: bool = True
    batch_size: int = 16
    workers: int = 0
    val_images: int = 32
    val_size: int = 64
    min_size: int = 16

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"data.{f.name}: expected an integer, got {value!r}")
            if kind == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"data.{f.name}: expected a number, got {value!r}")
            if kind == "bool" and not isinstance(value, bool):
                raise ConfigError(f"data.{f.name}: expected true or false, got {value!r}")
            if kind == "str" and not isinstance(value, str):
                raise ConfigError(f"data.{f.name}: expected a string, got {value!r}")
        if self.val is not None and not isinstance(self.val, str):
            raise ConfigError(f"data.val: expected a string or null, got {self.val!r}")
        for name in ("size", "batch_size", "val_images", "val_size", "min_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}: must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be 0 or more, got {self.workers}")
        self.transform()  # checks crop, min_scale and max_scale

    @classmethod
    def from_any(cls, cfg: Any) -> DataConfig:
        """From a mapping or any object with the schema's attributes (e.g. the trainer's config dataclass)."""
        if isinstance(cfg, DataConfig):
            return cfg
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(cfg, Mapping):
            unknown = sorted(set(cfg) - set(names))
            if unknown:
                raise ConfigError(f"data.{unknown[0]}: unknown key; known keys: {', '.join(names)}")
            return cls(**dict(cfg))
        return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})

    def transform(self) -> TrainTransform:
        return TrainTransform(self.size, self.crop, self.min_scale, self.max_scale, self.hflip)


# --- statistics ----------------------------------------------------------------------------------
@dataclass
class DataStats:
    """What the data pipeline left out, for the end-of-run report.

    ``skipped`` maps each file / tar entry / shard to the reason (``"kind: detail"``) it was left out,
    whether found by the up-front scan or at load time (each item once, however often it was hit).
    ``substituted`` counts training samples whose image failed to load and was replaced.
    """

    found: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    substituted: int = 0

    def add(self, skips: list[Skip], substituted: int = 0) -> None:
        for item, reason in skips:
            self.skipped.setdefault(item, reason)
        self.substituted += substituted

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def by_kind(self) -> dict[str, int]:
        """Skipped items counted by reason kind (``too small``, ``unreadable``, ``not an image``, …)."""
        return dict(Counter(reason.split(":", 1)[0] for reason in self.skipped.values()))

    def summary(self, limit: int = 10) -> str:
        """A short multi-line report: counts by kind, then up to ``limit`` items with their reasons."""
        if not self.skipped and not self.substituted:
            return "data: nothing skipped"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.by_kind().items()))
        lines = [
            f"data: {self.skipped_count} item(s) skipped ({kinds or 'none'}); {self.substituted} sample(s) substituted"
        ]
        for item, reason in list(self.skipped.items())[:limit]:
            lines.append(f"  {item}: {reason}")
        if self.skipped_count > limit:
            lines.append(f"  … and {self.skipped_count - limit} more")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (for metrics files)."""
        return {"found": self.found, "skipped": dict(self.skipped), "substituted": self.substituted}


# --- sources -------------------------------------------------------------------------------------
def open_source(spec: str, cfg: DataConfig, field_name: str = "data.train") -> MapSource | ShardSource:
    """The source named by ``spec``: ``builtin:NAME``, ``shards:PATTERN`` or a folder path."""
    if spec.startswith(BUILTIN_PREFIX):
        return BuiltinPhotos(spec[len(BUILTIN_PREFIX) :], field_name)
    if spec.startswith(SHARDS_PREFIX):
        return ShardSource(spec[len(SHARDS_PREFIX) :], cfg.min_size, field=field_name)
    if not spec:
        raise ConfigError(f"{field_name}: empty; give an image folder, builtin:photos or shards:PATTERN")
    return ImageFolder(spec, cfg.min_size, field=field_name)


def _seed64(seed: int) -> int:
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The crop/flip RNG of global sample ``position``."""
    return np.random.default_rng([_SALT_SAMPLE, _seed64(seed), position])


class _MapMicroBatches(Dataset):
    """Micro-batch ``t`` of one rank from an indexable source; item = (images, skips, substituted)."""

    def __init__(
        self, source: MapSource, transform: TrainTransform, seed: int, batch_size: int, rank: int, world_size: int
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, np.ndarray] = {}
        self._bad: dict[int, str] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([_SALT_EPOCH, _seed64(self.seed), epoch])
            self._perms[epoch] = rng.permutation(len(self.source))
        return self._perms[epoch]

    def sample(self, position: int, skips: list[Skip]) -> tuple[Tensor, bool]:
        """Training sample ``position`` and whether its image had to be substituted."""
        n = len(self.source)
        epoch, offset = divmod(position, n)
        perm = self._permutation(epoch)
        for attempt in range(n):
            index = int(perm[(offset + attempt) % n])
            if index in self._bad:
                continue
            try:
                image = self.source.load(index)
            except InputError as e:
                self._bad[index] = str(e)
                skips.append((self.source.name(index), str(e)))
                continue
            return self.transform(image, sample_rng(self.seed, position)), attempt > 0
        raise InputError(f"no image in {self.source.describe()} can be loaded (see the skipped-file report)")

    def __getitem__(self, t: int) -> tuple[Tensor, list[Skip], int]:
        first = (t * self.world_size + self.rank) * self.batch_size
        skips: list[Skip] = []
        images, substituted = [], 0
        for p in range(first, first + self.batch_size):
            image, replaced = self.sample(p, skips)
            images.append(image)
            substituted += replaced
        return torch.stack(images), skips, substituted


class _From(Sampler[int]):
    """Micro-batch indices ``start, start + 1, …`` forever."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class _ShardMicroBatches(IterableDataset):
    """This rank's micro-batches from a shard stream; DataLoader worker ``w`` of ``k`` makes every k-th."""

    def __init__(
        self,
        source: ShardSource,
        transform: TrainTransform,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        first: int,
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.first = first

    def _rng(self, position: int) -> np.random.Generator:
        return sample_rng(self.seed, position)

    def __iter__(self) -> Iterator[tuple[Tensor, list[Skip], int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = stream_batches(
            self.source,
            self.transform,
            self._rng,
            self.batch_size,
            self.rank,
            self.world_size,
            first=self.first + worker,
            every=workers,
            seed=self.seed,
        )
        for _, images, skips, substituted in batches:
            yield images, skips, substituted


def _as_is(item: Any) -> Any:
    return item


class BatchStream(Iterator[Tensor]):
    """Endless iterator of micro-batches ``(B, 3, size, size)`` float32 in [0, 1], in training order.

    ``stats`` accumulates what was skipped; ``description`` names the source for logs. Call ``close()``
    (or use it as a context manager) to stop loader worker processes early.
    """

    def __init__(self, items: Iterator[tuple[Tensor, list[Skip], int]], stats: DataStats, description: str) -> None:
        self._items: Iterator[tuple[Tensor, list[Skip], int]] | None = items
        self.stats = stats
        self.description = description

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Tensor:
        if self._items is None:
            raise StopIteration
        images, skips, substituted = next(self._items)
        self.stats.add(skips, substituted)
        return images

    def close(self) -> None:
        """Release the loader (and its worker processes)."""
        self._items = None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def train_batches(
    data_cfg: Any,
    seed: int,
    start_step: int,
    rank: int = 0,
    world_size: int = 1,
    accumulate: int = 1,
) -> BatchStream:
    """This rank's training micro-batches from optimizer step ``start_step`` on, endlessly.

    Yields ``accumulate`` micro-batches per optimizer step, each ``(data.batch_size, 3, data.size,
    data.size)`` float32 in [0, 1]. With ``data.workers`` > 0 the batches are made by that many
    DataLoader worker processes and are identical to ``workers = 0``. See the module docstring for the
    determinism contract.
    """
    cfg = DataConfig.from_any(data_cfg)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not valid for world_size {world_size}")
    if accumulate < 1:
        raise ConfigError(f"optim.accumulate: must be at least 1, got {accumulate}")
    if start_step < 0:
        raise ConfigError(f"start_step must be 0 or more, got {start_step}")
    source = open_source(cfg.train, cfg, "data.train")
    stats = DataStats(found=source.found)
    stats.add(source.skipped)
    first = start_step * accumulate
    transform = cfg.transform()
    # DataLoader draws its workers' base seed from this generator; without it, starting the loader would
    # consume the global torch RNG and shift the trainer's random stream (init, dropout) with data.workers.
    own = torch.Generator().manual_seed(_seed64(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    dataset: Dataset
    if isinstance(source, ShardSource):
        dataset = _ShardMicroBatches(source, transform, seed, cfg.batch_size, rank, world_size, first)
        if cfg.workers == 0:
            return BatchStream(iter(dataset), stats, source.describe())
        loader = DataLoader(dataset, batch_size=None, num_workers=cfg.workers, collate_fn=_as_is, generator=own)
    else:
        dataset = _MapMicroBatches(source, transform, seed, cfg.batch_size, rank, world_size)
        if cfg.workers == 0:
            return BatchStream(map(dataset.__getitem__, itertools.count(first)), stats, source.describe())
        loader = DataLoader(
            dataset, batch_size=None, sampler=_From(first), num_workers=cfg.workers, collate_fn=_as_is, generator=own
        )
    return BatchStream(iter(loader), stats, source.describe())


# --- validation ----------------------------------------------------------------------------------
def _val_crop(image: Tensor, k: int, round_: int, size: int) -> Tensor:
    """Crop ``round_`` of an image: 0 = the centre square; later rounds = fixed squares of 15–60 % of
    the short side² at positions drawn from ``k`` alone (the same for every run)."""
    h, w = image.shape[-2:]
    if round_ == 0:
        box = center_box(h, w)
    else:
        rng = np.random.default_rng([_SALT_VAL, k])
        side = max(1, round(min(h, w) * float(np.sqrt(rng.uniform(0.15, 0.6)))))
        box = (int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side, side)
    return resize(crop(image, box), size, size)


def validation_images(data_cfg: Any, seed: int = 0, stats: DataStats | None = None) -> Tensor | None:
    """The held-out set: ``(data.val_images, 3, data.val_size, data.val_size)`` float32 in [0, 1].

    ``None`` when ``data.val`` is null. Each held-out image gives its centre square; when there are fewer
    images than ``val_images``, further fixed square crops of each image fill the rest (decoding each
    image once more, so memory holds one full-size image at a time). A folder with more images than
    needed contributes images spread evenly over its sorted file list; a shard pattern its first images.
    The crops do not depend on ``seed`` (accepted for the trainer's call shape), so runs that differ only
    in seed are scored on the same pixels. Unusable files are skipped, and recorded in ``stats`` if given.
    """
    cfg = DataConfig.from_any(data_cfg)
    if cfg.val is None:
        return None
    stats = stats if stats is not None else DataStats()
    source = open_source(cfg.val, cfg, "data.val")
    stats.add(source.skipped)
    if isinstance(source, ShardSource):
        images = source.first_images
    else:
        n = len(source)
        chosen = [k * n // cfg.val_images for k in range(cfg.val_images)] if n > cfg.val_images else range(n)

        def images() -> Iterator[tuple[str, Tensor | None, str]]:
            for index in chosen:
                try:
                    yield source.name(index), source.load(index), ""
                except InputError as e:
                    yield source.name(index), None, str(e)

    crops: list[Tensor] = []
    for label, image, reason in images():
        if image is None:
            stats.add([(label, reason)])
            continue
        crops.append(_val_crop(image, len(crops), 0, cfg.val_size))
        if len(crops) == cfg.val_images:
            break
    if isinstance(source, ShardSource):
        stats.add(source.events)
    kept = len(crops)
    if kept == 0:
        raise InputError(f"data.val: {source.describe()}: no held-out image can be decoded")
    if kept < cfg.val_images:  # too few images: a second pass cuts the extra fixed crops, one image at a time
        extra: dict[int, Tensor] = {}
        seen = 0
        for _, image, _ in images():
            if image is None:
                continue
            for k in range(kept + seen, cfg.val_images, kept):
                extra[k] = _val_crop(image, k, k // kept, cfg.val_size)
            seen += 1
            if seen == kept:
                break
        crops.extend(extra[k] for k in range(kept, cfg.val_images))
    return torch.stack(crops)
