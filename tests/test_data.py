"""Training data: transforms, folder / built-in / shard sources, and the loader's determinism contract."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vtok.data import transforms as T
from vtok.data.builtin import BUILTINS, PHOTOS, BuiltinPhotos
from vtok.data.folder import ImageFolder
from vtok.data.loader import DataConfig, DataStats, train_batches, validation_images
from vtok.data.shards import ShardSource, expand_braces, expand_pattern
from vtok.errors import ConfigError, InputError

pytest.importorskip("skimage", reason="builtin:photos needs scikit-image (pip install 'vtok[train]')")


# --- fixtures: small images, bad files, shards ---------------------------------------------------
def _png(seed: int, width: int = 40, height: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


GOOD = 10  # good images in the fixture folder / shards


def _bad_files() -> dict[str, bytes]:
    """Name → bytes of each kind of file that must be skipped (min_size 16)."""
    return {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # PNG signature, garbage after
        "truncated.png": _png(99)[:600],  # valid header, pixel data cut: only decoding notices
        "notes.jpg": b"this is a text file, not a photo\n" * 10,
        "tiny.png": _png(98, 8, 8),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(GOOD):
        where = root if i < 4 else root / "sub" if i < 7 else root / "sub" / "deeper"
        (where / f"img{i:02d}.png").write_bytes(_png(i, 40 + i, 32 + 2 * i))
    for name, data in _bad_files().items():
        (root / "sub" / name).write_bytes(data)
    (root / "readme.txt").write_text("not an image extension: ignored by the walk, not counted")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards (webdataset layout, with a .json companion per sample); the bad entries sit in shard 1."""
    root = tmp_path_factory.mktemp("shards")
    samples: list[list[tuple[str, bytes]]] = [[], [], []]
    for i in range(GOOD):
        samples[i % 3].append((f"s{i:03d}.png", _png(100 + i, 36 + i, 30 + i)))
    for name, data in _bad_files().items():
        samples[1].append((name, data))
    for index, members in enumerate(samples):
        with tarfile.open(root / f"train-{index:03d}.tar", "w") as tar:
            for name, data in members:
                for member, payload in ((name, data), (name.split(".")[0] + ".json", b'{"label": 1}')):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


def _cfg(train: str, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {"train": train, "val": None, "size": 16, "batch_size": 4, "min_size": 16}
    base.update(kw)
    return base


def _take(stream: object, n: int) -> list[torch.Tensor]:
    out = [next(stream) for _ in range(n)]  # type: ignore[call-overload]
    stream.close()  # type: ignore[attr-defined]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- transforms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("crop", T.CROPS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("hw", [(30, 50), (7, 5), (64, 64)])
def test_transform_shape_range(crop: str, dtype: torch.dtype, hw: tuple[int, int]) -> None:
    image = torch.randint(0, 256, (3, *hw), dtype=torch.uint8)
    if dtype == torch.float32:
        image = image.float() / 255
    out = T.TrainTransform(16, crop, 0.2, 1.0, True)(image, np.random.default_rng(0))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    lo=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**32),
)
def test_random_resized_box_inside_image(h: int, w: int, lo: float, seed: int) -> None:
    top, left, bh, bw = T.random_resized_box(h, w, np.random.default_rng(seed), (lo, 1.0))
    assert 0 <= top and 0 <= left and 1 <= bh and 1 <= bw and top + bh <= h and left + bw <= w


def test_random_resized_box_statistics() -> None:
    rng = np.random.default_rng(0)
    boxes = [T.random_resized_box(200, 200, rng, (0.35, 1.0)) for _ in range(400)]
    areas = np.array([bh * bw for _, _, bh, bw in boxes]) / 200**2
    ratios = np.array([bw / bh for _, _, bh, bw in boxes])
    assert areas.min() >= 0.34 and areas.max() <= 1.0
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34
    assert len({(top, left) for top, left, _, _ in boxes}) > 100  # positions vary


def test_crops_take_the_right_pixels() -> None:
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30) / (3 * 20 * 30)
    centre = T.center_crop(image, 20)  # no resize needed: exactly the middle 20x20
    assert torch.equal(centre, image[:, :, 5:25])
    crop = T.random_crop(image, 8, np.random.default_rng(3))
    windows = [image[:, t : t + 8, s : s + 8] for t in range(13) for s in range(23)]
    assert any(torch.equal(crop, w) for w in windows)
    small = T.random_crop(torch.rand(3, 6, 12), 10, np.random.default_rng(0))  # short side 6 < 10: upscaled
    assert small.shape == (3, 10, 10)


def test_hflip_and_rng_discipline() -> None:
    image = torch.rand(3, 5, 7)
    flips = [T.hflip(image, np.random.default_rng(s)) for s in range(20)]
    assert any(torch.equal(f, image.flip(-1)) for f in flips) and any(torch.equal(f, image) for f in flips)
    assert all(torch.equal(f, image) or torch.equal(f, image.flip(-1)) for f in flips)
    photo = torch.rand(3, 50, 60)
    with_flip = T.TrainTransform(16, hflip=True)(photo, np.random.default_rng(5))
    without = T.TrainTransform(16, hflip=False)(photo, np.random.default_rng(5))
    assert torch.equal(with_flip, without) or torch.equal(with_flip, without.flip(-1))  # same window
    state = np.random.get_state()[1].copy()
    T.TrainTransform(16)(photo, np.random.default_rng(1))
    assert np.array_equal(state, np.random.get_state()[1])  # global RNG untouched


# --- determinism, resume, workers, ranks ---------------------------------------------------------
def test_builtin_same_seed_same_batches_different_seed_different() -> None:
    cfg = _cfg("builtin:photos", size=32)
    a = _take(train_batches(cfg, seed=7, start_step=0), 3)
    b = _take(train_batches(cfg, seed=7, start_step=0), 3)
    c = _take(train_batches(cfg, seed=8, start_step=0), 3)
    assert _same(a, b)
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (4, 3, 32, 32) and a[0].dtype == torch.float32
    assert 0.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("kind", ["folder", "builtin", "shards"])
def test_resume_reproduces_the_tail(kind: str, folder: Path, shards: Path) -> None:
    train = {"folder": str(folder), "builtin": "builtin:photos", "shards": f"shards:{shards}/train-{{000..002}}.tar"}
    cfg = _cfg(train[kind])
    full = _take(train_batches(cfg, seed=3, start_step=0, accumulate=2), 14)  # 7 steps, several epochs
    tail = _take(train_batches(cfg, seed=3, start_step=5, accumulate=2), 4)
    assert _same(full[10:], tail)


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_workers_give_identical_batches(kind: str, folder: Path, shards: Path) -> None:
    train = str(folder) if kind == "folder" else f"shards:{shards}/*.tar"
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    serial = train_batches(_cfg(train), seed=1, start_step=2)
    parallel = train_batches(_cfg(train, workers=2), seed=1, start_step=2)
    a, b = [next(serial) for _ in range(7)], [next(parallel) for _ in range(7)]
    parallel.close()
    assert _same(a, b)
    # the trainer's random streams are not touched, whatever data.workers is
    assert torch.equal(torch_state, torch.get_rng_state()) and np.array_equal(numpy_state, np.random.get_state()[1])
    assert serial.stats.substituted == parallel.stats.substituted > 0  # the truncated file was hit
    assert set(serial.stats.skipped) == set(parallel.stats.skipped)


@pytest.mark.parametrize("kind", ["folder", "builtin", "shards"])
def test_ranks_split_the_global_batch(kind: str, folder: Path, shards: Path) -> None:
    train = {"folder": str(folder), "builtin": "builtin:photos", "shards": f"shards:{shards}/*.tar"}[kind]
    one = _take(train_batches(_cfg(train, batch_size=6), seed=2, start_step=1, accumulate=2), 4)
    r0 = _take(train_batches(_cfg(train, batch_size=3), seed=2, start_step=1, rank=0, world_size=2, accumulate=2), 4)
    r1 = _take(train_batches(_cfg(train, batch_size=3), seed=2, start_step=1, rank=1, world_size=2, accumulate=2), 4)
    assert _same(one, [torch.cat([a, b]) for a, b in zip(r0, r1, strict=True)])


# --- bad files -----------------------------------------------------------------------------------
def test_folder_skips_and_counts_bad_files(folder: Path) -> None:
    source = ImageFolder(folder, min_size=16)
    assert len(source) == GOOD + 1  # the truncated PNG has a valid header: caught at load time
    assert source.found == GOOD + 4  # readme.txt is not an image name, so it is not even found
    reasons = {Path(p).name: r for p, r in source.skipped}
    assert set(reasons) == {"corrupt.png", "notes.jpg", "tiny.png"}
    assert reasons["tiny.png"].startswith("too small") and reasons["notes.jpg"].startswith("not an image")
    stream = train_batches(_cfg(str(folder)), seed=0, start_step=0)
    batches = _take(stream, 12)  # 48 samples: every image several times, never a crash
    assert all(b.shape == (4, 3, 16, 16) for b in batches)
    stats = stream.stats
    assert stats.skipped_count == 4 and stats.substituted >= 4
    assert stats.by_kind() == {"too small": 1, "not an image": 2, "unreadable": 1}
    assert "truncated.png" in stats.summary() and "4 item(s) skipped" in stats.summary()
    assert stats.as_dict()["found"] == GOOD + 4


def test_shards_skip_and_count_bad_entries(shards: Path, tmp_path: Path) -> None:
    stream = train_batches(_cfg(f"shards:{shards}/train-{{000..002}}.tar"), seed=0, start_step=0)
    batches = _take(stream, 9)  # 36 samples over ~3 epochs of 14 entries
    assert all(b.shape == (4, 3, 16, 16) and 0 <= float(b.min()) and float(b.max()) <= 1 for b in batches)
    kinds = stream.stats.by_kind()
    assert {Path(k.split(":")[-1]).name for k in stream.stats.skipped} == set(_bad_files())
    assert kinds == {"unreadable": 1, "not an image": 2, "too small": 1}  # as in a folder
    assert stream.stats.substituted >= 4
    whole = (shards / "train-000.tar").read_bytes()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(whole[: len(whole) * 6 // 10])  # tar cut off part-way: the samples before still count
    (tmp_path / "garbage.tar").write_text("not a tar archive\n")
    stream = train_batches(_cfg(f"shards:{tmp_path}/{{broken,garbage}}.tar", batch_size=2), seed=0, start_step=0)
    assert _take(stream, 3)[0].shape == (2, 3, 16, 16)
    shard_reasons = {Path(k).name: r for k, r in stream.stats.skipped.items() if r.startswith("bad shard")}
    assert shard_reasons["broken.tar"].startswith("bad shard: stops at sample")
    assert shard_reasons["garbage.tar"].startswith("bad shard: cannot open")
    broken.write_bytes(whole[:3000])  # only a truncated first image: nothing can ever be decoded
    with pytest.raises(InputError, match="no decodable image"):
        next(train_batches(_cfg(f"shards:{broken}"), seed=0, start_step=0))


def test_shard_layout_and_patterns(shards: Path) -> None:
    assert expand_braces("a{000..002}b{x,y}") == ["a000bx", "a000by", "a001bx", "a001by", "a002bx", "a002by"]
    assert expand_braces("{1..3}") == ["1", "2", "3"] and expand_braces("x{y}") == ["x{y}"]
    assert expand_braces("{a,{b,c}}") == ["a", "b", "c"]
    assert [p.name for p in expand_pattern(f"{shards}/train-00[02].tar")] == ["train-000.tar", "train-002.tar"]
    source = ShardSource(f"{shards}/train-001.tar")
    labels = [label for label, _ in source.samples(0)]
    assert len(labels) == 3 + 4 and not any(label.endswith(".json") for label in labels)  # one image per key
    with pytest.raises(InputError, match=r"data\.train: .*3 shard name\(s\) match no file.*train-003"):
        expand_pattern(f"{shards}/train-{{000..005}}.tar")


# --- built-in photos -----------------------------------------------------------------------------
def test_builtin_train_and_val_are_disjoint() -> None:
    train, val = set(BUILTINS["photos"]), set(BUILTINS["photos-val"])
    assert train.isdisjoint(val) and 2 <= len(val) <= 3 and len(train) >= 5
    assert train | val <= set(PHOTOS)
    train_pixels = {BuiltinPhotos("photos").load(i).numpy().tobytes() for i in range(len(train))}
    val_source = BuiltinPhotos("photos-val")
    assert all(val_source.load(i).numpy().tobytes() not in train_pixels for i in range(len(val)))


def test_validation_images() -> None:
    cfg = {"val": "builtin:photos-val", "val_images": 6, "val_size": 24}
    v = validation_images(cfg, seed=0)
    assert v is not None and v.shape == (6, 3, 24, 24) and 0 <= float(v.min()) and float(v.max()) <= 1
    assert torch.equal(v, validation_images(cfg, seed=123))  # same held-out pixels for every seed
    assert not torch.equal(v[0], v[2])  # extra crops differ from the centre crops
    assert validation_images({"val": None}, seed=0) is None


def test_validation_from_folder_and_shards(folder: Path, shards: Path) -> None:
    stats = DataStats()
    v = validation_images({"val": str(folder), "val_images": 5, "val_size": 16}, 0, stats)
    assert v is not None and v.shape == (5, 3, 16, 16) and stats.skipped_count >= 3
    stats = DataStats()
    v = validation_images({"val": f"shards:{shards}/train-001.tar", "val_images": 8, "val_size": 16}, 0, stats)
    assert v is not None and v.shape == (8, 3, 16, 16)  # 3 good images: centre crops + fixed extra crops
    assert stats.skipped_count == 4


# --- errors for people ---------------------------------------------------------------------------
def test_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match=r"data\.train: .*no-such-dir: no such file"):
        train_batches(_cfg(str(tmp_path / "no-such-dir")), seed=0, start_step=0)
    with pytest.raises(InputError, match=r"data\.train: .*matches no shard files|match no file"):
        train_batches(_cfg(f"shards:{tmp_path}/*.tar"), seed=0, start_step=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="none of its 1 image files is usable"):
        train_batches(_cfg(str(tmp_path / "bad")), seed=0, start_step=0)
    with pytest.raises(ConfigError, match="did you mean builtin:photos"):
        train_batches(_cfg("builtin:photo"), seed=0, start_step=0)
    with pytest.raises(ConfigError, match=r"data\.sise: unknown key"):
        DataConfig.from_any({"sise": 3})
    with pytest.raises(ConfigError, match=r"data\.size: expected an integer"):
        DataConfig.from_any({"size": "64"})
    with pytest.raises(ConfigError, match=r"data\.crop"):
        DataConfig.from_any({"crop": "middle"})
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ConfigError, match=r"pip install 'vtok\[train\]'"):
        train_batches(_cfg("builtin:photos"), seed=0, start_step=0)
