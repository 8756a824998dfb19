"""Reading and writing image files: formats, modes, EXIF, bombs, broken files, folders, samples."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from vtok.data import images as images_mod
from vtok.data.images import (
    ASSETS_DIR,
    SAMPLES,
    expand_inputs,
    load_image,
    sample_name,
    sample_path,
    save_image,
    to_uint8,
)
from vtok.errors import InputError

RNG = np.random.default_rng(0)


def rgb_array(h: int = 30, w: int = 20) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def as_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def png_bytes(width: int, height: int, depth: int, color_type: int, raw: bytes) -> bytes:
    """A minimal PNG written by hand, so headers can claim anything (sizes, bit depths)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# --- formats and modes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ext", "fmt", "kwargs", "lossless"),
    [
        ("png", "PNG", {}, True),
        ("bmp", "BMP", {}, True),
        ("tif", "TIFF", {}, True),
        ("tiff", "TIFF", {"compression": "tiff_lzw"}, True),
        ("webp", "WEBP", {"lossless": True}, True),
        ("webp", "WEBP", {"quality": 95}, False),
        ("jpg", "JPEG", {"quality": 95}, False),
        ("gif", "GIF", {}, False),
    ],
)
def test_every_format_loads_as_float_rgb(tmp_path: Path, ext: str, fmt: str, kwargs: dict, lossless: bool) -> None:
    # a smooth image, so lossy codecs stay close to it
    yy, xx = np.mgrid[0:30, 0:20]
    a = np.stack([xx * 12, yy * 8, (xx + yy) * 5], axis=-1).astype(np.uint8)
    path = tmp_path / f"img.{ext}"
    Image.fromarray(a).save(path, format=fmt, **kwargs)
    x, _ = load_image(path)
    assert x.dtype == torch.float32 and x.shape == (3, 30, 20)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    err = np.abs(as_hwc(x) - a / 255.0)
    if lossless:
        assert err.max() < 1e-6
    else:
        assert err.mean() < 0.05


def test_grayscale_becomes_rgb_with_a_note(tmp_path: Path) -> None:
    g = RNG.integers(0, 256, (12, 9), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    x, notes = load_image(tmp_path / "g.png")
    assert x.shape == (3, 12, 9)
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), g / 255.0, atol=1e-7)
    assert notes == ["converted grayscale to RGB"]


def test_plain_rgb_has_no_notes(tmp_path: Path) -> None:
    a = rgb_array()
    Image.fromarray(a).save(tmp_path / "a.png")
    x, notes = load_image(tmp_path / "a.png")
    assert notes == []
    np.testing.assert_array_equal((as_hwc(x) * 255).round().astype(np.uint8), a)


def test_rgba_is_composited_onto_white(tmp_path: Path) -> None:
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[..., 0] = 200  # red channel everywhere
    a[0, 0, 3], a[0, 1, 3], a[0, 2, 3] = 255, 0, 102  # opaque, transparent, 40% opaque
    a[1, :, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    x, notes = load_image(tmp_path / "a.png")
    px = as_hwc(x)
    np.testing.assert_allclose(px[0, 0], [200 / 255, 0, 0], atol=1e-6)  # opaque: unchanged
    np.testing.assert_allclose(px[0, 1], [1, 1, 1], atol=1e-6)  # transparent: white
    alpha = 102 / 255
    np.testing.assert_allclose(px[0, 2], [200 / 255 * alpha + 1 - alpha, 1 - alpha, 1 - alpha], atol=1e-6)
    assert any("composited" in n and "white" in n for n in notes)


def test_opaque_rgba_equals_rgb_without_compositing_note(tmp_path: Path) -> None:
    a = rgb_array()
    rgba = np.concatenate([a, np.full((*a.shape[:2], 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x, notes = load_image(tmp_path / "a.png")
    np.testing.assert_allclose(as_hwc(x), a / 255.0, atol=1e-7)
    assert not any("composited" in n for n in notes)


def test_palette_image_keeps_its_colours(tmp_path: Path) -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    idx = RNG.integers(0, 3, (7, 5), dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    x, notes = load_image(tmp_path / "p.png")
    expected = np.array(palette[:9]).reshape(3, 3)[idx] / 255.0
    np.testing.assert_allclose(as_hwc(x), expected, atol=1e-7)
    assert "converted palette image to RGB" in notes


def test_palette_transparency_is_composited(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.save(tmp_path / "p.png", transparency=0)
    x, notes = load_image(tmp_path / "p.png")
    np.testing.assert_allclose(as_hwc(x)[0, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(as_hwc(x)[0, 1], [10 / 255, 20 / 255, 30 / 255], atol=1e-6)
    assert any("composited" in n for n in notes)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path, fmt: str) -> None:
    values = np.array([[0, 300, 255, 256], [32768, 65535, 1000, 60000]], dtype=np.uint16)
    path = tmp_path / f"g16.{fmt.lower()}"
    Image.fromarray(values).save(path, format=fmt)
    x, notes = load_image(path)
    np.testing.assert_allclose(x[1].numpy(), values / 65535.0, atol=1e-7)
    assert float(x[0, 0, 1]) < 0.01  # 300 of 65535 is dark, not clipped to white at 255
    assert "converted 16-bit grayscale to RGB (scaled by 1/65535)" in notes


def test_16bit_rgb_png_is_reduced_to_8bit_with_a_note(tmp_path: Path) -> None:
    a = RNG.integers(0, 65536, (4, 5, 3)).astype(">u2")
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(4))
    (tmp_path / "rgb16.png").write_bytes(png_bytes(5, 4, 16, 2, raw))
    x, notes = load_image(tmp_path / "rgb16.png")
    np.testing.assert_allclose(as_hwc(x), (a.astype(np.int64) >> 8) / 255.0, atol=1e-6)
    assert any("16-bit colour" in n for n in notes)


def test_one_bit_and_cmyk_are_converted(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "b.png")
    x, notes = load_image(tmp_path / "b.png")
    np.testing.assert_allclose(as_hwc(x)[0], [[0, 0, 0], [1, 1, 1]])
    assert any("1-bit" in n for n in notes)
    Image.fromarray(rgb_array()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    x, notes = load_image(tmp_path / "c.jpg")
    assert x.shape == (3, 30, 20)
    assert "converted CMYK to RGB" in notes


@pytest.mark.parametrize(("orientation", "rotate"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, rotate: int) -> None:
    a = rgb_array(6, 10)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    x, notes = load_image(tmp_path / "r.png")
    expected = np.rot90(a, k=rotate)  # k>0: counter-clockwise
    assert x.shape == (3, *expected.shape[:2])
    np.testing.assert_allclose(as_hwc(x), expected / 255.0, atol=1e-7)
    assert any(f"EXIF orientation {orientation}" in n for n in notes)


def test_multi_frame_file_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
    x, notes = load_image(tmp_path / "m.tif")
    np.testing.assert_allclose(x.numpy(), 10 / 255, atol=1e-7)
    assert "used the first of 2 frames" in notes


# --- failures ------------------------------------------------------------------------------------
def expect_error(path: Path, *fragments: str, **kwargs: object) -> str:
    with pytest.raises(InputError) as e:
        load_image(path, **kwargs)  # type: ignore[arg-type]
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for f in fragments:
        assert f in message, message
    return message


def test_missing_directory_and_empty_files(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.png", "no such file")
    expect_error(tmp_path, "is a directory")
    (tmp_path / "empty.png").write_bytes(b"")
    expect_error(tmp_path / "empty.png", "empty file")


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    expect_error(tmp_path / "notes.png", "text file", "not an image")
    (tmp_path / "noise.png").write_bytes(bytes(RNG.integers(0, 256, 300, dtype=np.uint8)) + b"\x00")
    expect_error(tmp_path / "noise.png", "not a recognised image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_truncated_files_are_rejected(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb_array(64, 64)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    expect_error(path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    Image.fromarray(rgb_array()).save(path)
    if os.geteuid() != 0:  # root reads anything, so also check the branch with a stand-in below
        path.chmod(0)
        try:
            expect_error(path, "permission denied")
        finally:
            path.chmod(0o644)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images_mod.Image, "open", refuse)
    expect_error(path, "permission denied")


def test_pixel_limit_refuses_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(rgb_array(30, 20)).save(path)
    assert load_image(path, max_pixels=600)[0].shape == (3, 30, 20)  # exactly at the limit: fine

    def no_decoding(self: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    expect_error(path, "20x30", "limit", max_pixels=599)


def test_header_claiming_a_huge_image_is_refused_cheaply(tmp_path: Path) -> None:
    # 100 MP claimed: over vtok's 64 MP default, under Pillow's own error threshold
    (tmp_path / "big.png").write_bytes(png_bytes(10_000, 10_000, 8, 2, b"\x00" * 16))
    expect_error(tmp_path / "big.png", "10000x10000", "64 MP limit")
    # 10 gigapixels claimed: Pillow's guard fires first and is reported the same way
    (tmp_path / "bomb.png").write_bytes(png_bytes(100_000, 100_000, 8, 2, b"\x00" * 16))
    expect_error(tmp_path / "bomb.png", "too large")
    # a limit above Pillow's own lifts Pillow's guard while opening, and restores it afterwards
    pillow = Image.MAX_IMAGE_PIXELS
    assert pillow is not None
    with images_mod._pillow_limit(3 * pillow):
        assert Image.MAX_IMAGE_PIXELS is None
    with images_mod._pillow_limit(10_000):
        assert Image.MAX_IMAGE_PIXELS == pillow
    assert Image.MAX_IMAGE_PIXELS == pillow


# --- listing inputs ------------------------------------------------------------------------------
def test_expand_inputs_walks_folders_sorted(tmp_path: Path) -> None:
    for rel in ["b/z.PNG", "b/a.jpg", "a.png", "c/d/e.webp", "notes.txt", ".hidden.png", ".git/x.png"]:
        p = tmp_path / "root" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    single = tmp_path / "single.dat"
    single.write_bytes(b"x")
    files = expand_inputs([tmp_path / "root", single, tmp_path / "root" / "a.png"])
    rel = [p.relative_to(tmp_path).as_posix() for p in files]
    assert rel == ["root/a.png", "root/b/a.jpg", "root/b/z.PNG", "root/c/d/e.webp", "single.dat"]
    assert expand_inputs([tmp_path / "root"]) == files[:4]  # deterministic


def test_expand_inputs_reports_missing_and_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok.png").write_bytes(b"x")
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([tmp_path / "missing.png"])
    errors: list[str] = []
    files = expand_inputs([tmp_path / "missing.png", tmp_path / "empty", tmp_path / "ok.png", "sample:astronat"],
                          errors=errors)
    assert files == [tmp_path / "ok.png"]
    assert len(errors) == 3
    assert "missing.png: no such file" in errors[0]
    assert "contains no image files" in errors[1]
    assert "did you mean astronaut" in errors[2]


# --- writing -------------------------------------------------------------------------------------
def test_save_image_rounds_to_8bit_atomically(tmp_path: Path) -> None:
    x = torch.tensor([0.0, 0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 1.0, 1.5, -0.2]).reshape(1, 1, 6).repeat(3, 1, 1)
    out = save_image(x[None], tmp_path / "sub" / "x.png")
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]  # no temporary file left
    a = np.asarray(Image.open(out))
    assert a.dtype == np.uint8 and a.shape == (1, 6, 3)
    assert a[0, :, 0].tolist() == [0, 0, 1, 255, 255, 0]
    with pytest.raises(InputError):
        save_image(torch.zeros(2, 3, 4, 4), tmp_path / "bad.png")


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_save_then_load_is_exact_for_8bit_values(tmp_path_factory: pytest.TempPathFactory, h: int, w: int,
                                                  seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (3, h, w), generator=g).float() / 255.0
    path = save_image(x, tmp_path_factory.mktemp("rt") / "x.png")
    y, notes = load_image(path)
    assert notes == []
    assert torch.equal(to_uint8(y), to_uint8(x))
    torch.testing.assert_close(y, x, atol=1e-7, rtol=0)


# --- samples -------------------------------------------------------------------------------------
def test_bundled_samples_load_and_are_small() -> None:
    total = sum(p.stat().st_size for p in ASSETS_DIR.iterdir() if p.is_file())
    assert total < 300_000
    readme = (ASSETS_DIR / "README.md").read_text(encoding="utf-8")
    assert len(SAMPLES) >= 2
    for name, sample in SAMPLES.items():
        x, notes = load_image(sample_path(name))
        assert notes == []
        assert x.shape[0] == 3 and max(x.shape[1:]) <= 256
        assert sample.file in readme
        assert sample_name(sample.path) == f"sample:{name}"
    assert expand_inputs(["sample:coffee"]) == [sample_path("coffee")]
    with pytest.raises(InputError, match="did you mean chelsea"):
        sample_path("chelsey")
