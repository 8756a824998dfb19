"""The ``vtok`` command line end to end on tiny models, every bad input, and the token file format."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import vtok
from vtok import cli
from vtok.cli import main, output_names, psnr_8bit
from vtok.data.images import load_image, to_uint8
from vtok.errors import InputError
from vtok.models import registry
from vtok.models.tokenizer import TokenizerInfo
from vtok.tokenfile import config_hash, id_dtype_for, load_tokens, save_tokens
from vtok.tokens import TokenBatch

ENCODER: dict[str, Any] = {"channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4,
                           "mid_attention": False}
FSQ: dict[str, Any] = {"type": "fsq", "levels": [5, 5, 5, 5]}  # 625 codes: stored as int16


def tiny(quantizer: dict[str, Any] = FSQ, name: str = "tiny", **encoder: Any) -> vtok.Tokenizer:
    torch.manual_seed(0)
    return vtok.Tokenizer(encoder={**ENCODER, **encoder}, quantizer=quantizer, name=name).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-fsq"
    tiny().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def imgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:24, 0:40]
    smooth = np.stack([xx * 6, yy * 10, (xx + yy) * 3], axis=-1).astype(np.uint8)
    paths = {"a": root / "a.png", "b": root / "b.jpg", "gray": root / "gray.png"}
    Image.fromarray(smooth).save(paths["a"])  # 40x24: a multiple of f=4
    Image.fromarray(rng.integers(0, 256, (17, 33, 3), dtype=np.uint8)).save(paths["b"], quality=90)  # odd size
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(paths["gray"])
    return paths


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The single ``vtok: error:`` line of a failed command."""
    lines = [ln for ln in err.splitlines() if ln.startswith("vtok: error:")]
    assert len(lines) == 1, err
    return lines[0]


def png_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


# --- end to end ----------------------------------------------------------------------------------
def test_encode_then_decode_matches_tokenizer(ckpt: Path, imgs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    tok = vtok.load(ckpt)
    tokens = tmp_path / "t.safetensors"
    code, out, err = run(capsys, "encode", imgs["a"], imgs["b"], imgs["gray"], "-m", ckpt, "-o", tokens)
    assert code == 0, err
    assert "wrote 3 image(s)" in out
    assert f"{imgs['gray']}: converted grayscale to RGB" in err  # conversions are reported
    with safe_open(str(tokens), framework="pt") as f:
        assert f.get_tensor("ids.0").dtype == torch.int16 and sorted(f.keys()) == ["ids.0", "ids.1", "ids.2"]
    tf = load_tokens(tokens, info=tok.info)
    assert tf.sources == [str(imgs["a"]), str(imgs["b"]), str(imgs["gray"])]
    assert tf.model == str(ckpt) and tf.config_hash == config_hash(tok.get_config())

    code, out, err = run(capsys, "decode", tokens, "-m", ckpt, "-o", tmp_path / "dec")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["a.png", "b.png", "gray.png"]
    for key, item in zip(["a", "b", "gray"], tf.items, strict=True):
        image, _ = load_image(imgs[key])
        with torch.no_grad():
            ref_tokens = tok.encode(image[None])
            ref = tok.reconstruct(image[None])[0]
        assert torch.equal(item.ids, ref_tokens.ids) and item.size == tuple(image.shape[1:])
        decoded = png_rgb(tmp_path / "dec" / f"{key}.png")
        expected = to_uint8(ref).permute(1, 2, 0).numpy().astype(np.int16)
        assert decoded.shape == expected.shape
        assert np.abs(decoded - expected).max() <= 1  # to 1/255


def test_reconstruct_reports_psnr_grid_and_bitrate(ckpt: Path, imgs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tok = vtok.load(ckpt)
    code, out, err = run(capsys, "reconstruct", imgs["a"], "-m", ckpt, "-o", tmp_path / "side.png")
    assert code == 0, err
    image, _ = load_image(imgs["a"])
    with torch.no_grad():
        recon = tok.reconstruct(image[None])[0]
    psnr = float(re.search(r"PSNR:\s+([0-9.]+) dB", out).group(1))  # type: ignore[union-attr]
    assert psnr == pytest.approx(psnr_8bit(image, recon), abs=0.006)
    bpp = tok.info.bits_per_pixel((24, 40))
    assert "6x10 grid (60 positions)" in out and f"{bpp:.4g} bits/pixel" in out
    assert f"{tok.info.bits_per_token:.4g} bits/token" in out
    side = png_rgb(tmp_path / "side.png")
    assert side.shape == (24, 80, 3)
    assert np.array_equal(side[:, :40], png_rgb(imgs["a"]))  # left: the original
    assert np.abs(side[:, 40:] - to_uint8(recon).permute(1, 2, 0).numpy()).max() <= 1  # right: reconstruction


def test_psnr_is_on_8bit_values_with_range_one() -> None:
    a = torch.zeros(3, 4, 4)
    assert psnr_8bit(a, a + 0.001) == math.inf  # rounds to the same 8-bit value
    b = a.clone()
    b[0, 0, 0] = 1.0  # one of 48 values off by 1
    assert psnr_8bit(a, b) == pytest.approx(10 * math.log10(48))


def test_reconstruct_a_bundled_sample(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "reconstruct", "--sample", "chelsea", "-m", ckpt)
    assert code == 0, err
    assert "sample:chelsea (192x128)" in out and "PSNR" in out
    assert run(capsys, "reconstruct", "sample:chelsea", "-m", ckpt)[1] == out  # the same as a pseudo-path
    code, _, err = run(capsys, "reconstruct", "sample:chelsey", "-m", ckpt)
    assert code == 2 and "did you mean chelsea" in error_line(err)
    code, _, err = run(capsys, "reconstruct", "--sample", "chelsey", "-m", ckpt)
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "reconstruct", "-m", ckpt)
    assert code == 2 and "needs an IMAGE or --sample" in error_line(err)


def test_continuous_tokens_round_trip(tmp_path: Path, imgs: dict[str, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    tok = tiny({"type": "kl", "latent_channels": 3})
    tok.save_pretrained(str(tmp_path / "kl"))
    code, _, err = run(capsys, "encode", imgs["b"], "-m", tmp_path / "kl", "-o", tmp_path / "t.safetensors")
    assert code == 0, err
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.get_tensor("latents.0").dtype == torch.float32
    code, _, err = run(capsys, "decode", tmp_path / "t.safetensors", "-m", tmp_path / "kl", "-o", tmp_path / "d")
    assert code == 0, err
    image, _ = load_image(imgs["b"])
    with torch.no_grad():
        ref = to_uint8(tok.reconstruct(image[None])[0]).permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(png_rgb(tmp_path / "d" / "b.png") - ref).max() <= 1


def test_decode_avoids_name_clashes(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert output_names(["a/x.png", "b/x.jpg", "X.png", "x-2.png", "sample:coffee", "we ird?.png", "???.png"]) == [
        "x.png", "x-2.png", "X-3.png", "x-2-2.png", "coffee.png", "we_ird.png", "item6.png",
    ]
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / d / "x.png")
    code, _, err = run(capsys, "encode", tmp_path / "one", tmp_path / "two", "-m", ckpt, "-o", tmp_path / "t.st")
    assert code == 0, err
    code, _, err = run(capsys, "decode", tmp_path / "t.st", "-m", ckpt, "-o", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x-2.png", "x.png"]


# --- models --------------------------------------------------------------------------------------
def test_models_lists_every_preset_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.process_time()  # CPU time: other jobs on the machine do not make it flaky
    code, out, err = run(capsys, "models")
    elapsed = time.process_time() - start
    assert code == 0, err
    assert elapsed < 5.0
    lines = out.splitlines()
    assert lines[0].split()[:7] == ["name", "family", "f", "vocab", "bits/token", "params", "trained"]
    for name, preset in registry.PRESETS.items():
        row = next(ln for ln in lines if ln.startswith(name + " "))
        assert preset.config["quantizer"]["type"] in row and preset.description in row
    assert "?" not in out.split()  # every family built (on the meta device) and was described
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(registry.PRESETS) <= set(rows)
    assert all(rows[n]["params"] > 1_000_000 for n in registry.PRESETS)
    assert rows["rvq-f8-4x4k"]["vocab"] == "4x4096" and rows["rvq-f8-4x4k"]["bits_per_token"] == 48
    fsq = rows["fsq-f8-64k"]
    assert (fsq["family"], fsq["f"], fsq["vocab"], fsq["trained"]) == ("fsq", "8", "64000", False)
    assert fsq["bits_per_token"] == pytest.approx(math.log2(64000), abs=1e-3)
    params = sum(p.numel() for p in vtok.create("fsq-f8-64k").parameters())
    assert fsq["params"] == params
    assert rows["kl-f8-c4"]["vocab"] == "continuous (4 ch)" and rows["kl-f8-c4"]["bits_per_token"] is None


def test_untrained_preset_warns_that_output_is_noise(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = {"architecture": "conv2d", "name": "tiny-preset", "encoder": ENCODER, "quantizer": FSQ}
    monkeypatch.setitem(registry.PRESETS, "tiny-preset", registry.Preset("tiny-preset", "test", config))
    code, out, err = run(capsys, "reconstruct", "sample:coffee", "-m", "tiny-preset")
    assert code == 0
    assert "untrained" in err and "noise" in err and "PSNR" in out
    assert "tiny-preset (fsq, f=4, untrained: random weights)" in out


def test_unknown_model_suggests_close_matches(imgs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "encode", imgs["a"], "-m", "vq-f8-16", "-o", tmp_path / "t.st")
    assert code == 2
    assert "vq-f8-16k" in error_line(err)
    code, _, err = run(capsys, "encode", imgs["a"], "-m", tmp_path / "no" / "ckpt", "-o", tmp_path / "t.st")
    assert code == 2 and "no such checkpoint folder" in error_line(err)
    assert not (tmp_path / "t.st").exists()


def test_missing_default_model_asks_for_m(imgs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(registry, "pretrained_names", lambda: [])
    code, _, err = run(capsys, "reconstruct", imgs["a"])
    assert code == 2 and "pass -m" in error_line(err)


# --- bad inputs ----------------------------------------------------------------------------------
def make_bad(kind: str, root: Path) -> tuple[Path, str, list[str]]:
    """A bad input file, the message fragment expected for it, and extra CLI options."""
    if kind in ("truncated-png", "truncated-jpeg"):
        fmt = "PNG" if kind == "truncated-png" else "JPEG"
        path = root / f"cut.{fmt.lower()}"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        return path, "truncated", []
    if kind == "text":
        (root / "readme.png").write_text("hello\n")
        return root / "readme.png", "text file", []
    if kind == "empty":
        (root / "empty.jpg").write_bytes(b"")
        return root / "empty.jpg", "empty file", []
    if kind == "missing":
        return root / "missing.png", "no such file", []
    if kind == "pixel-limit":
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "big.png")
        return root / "big.png", "over the 0.0001 MP limit", ["--max-pixels", "100"]
    raise AssertionError(kind)


BAD_KINDS = ["truncated-png", "truncated-jpeg", "text", "empty", "missing", "pixel-limit"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_input_is_one_line_and_nothing_is_written(kind: str, ckpt: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path, fragment, extra = make_bad(kind, tmp_path)
    out = tmp_path / "t.safetensors"
    code, _, err = run(capsys, "encode", path, "-m", ckpt, "-o", out, *extra)
    assert code == 2
    assert "skipped 1 file(s):" in err and fragment in err and str(path) in err
    assert "nothing written" in error_line(err)
    assert not out.exists()
    code, _, err = run(capsys, "reconstruct", path, "-m", ckpt, *extra)  # the single-image command too
    assert code == 2 and fragment in error_line(err)


def test_huge_header_is_refused_before_decoding(ckpt: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    for side, fragment in [(10_000, "64 MP limit"), (100_000, "too large")]:
        header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
        path = tmp_path / f"claims-{side}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b""))
        start = time.process_time()
        code, _, err = run(capsys, "reconstruct", path, "-m", ckpt)
        assert code == 2 and fragment in error_line(err) and str(path) in error_line(err)
        assert time.process_time() - start < 2.0


def test_unreadable_file_is_reported(ckpt: Path, imgs: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # root can read a chmod-000 file, so the permission failure is simulated where the file is opened
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("vtok.data.images.Image.open", refuse)
    code, _, err = run(capsys, "reconstruct", imgs["a"], "-m", ckpt)
    assert code == 2 and f"{imgs['a']}: permission denied" in error_line(err)


def test_batch_writes_good_files_and_lists_bad_ones(ckpt: Path, imgs: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bad = [make_bad(k, tmp_path)[0] for k in ("truncated-png", "text", "empty", "missing")]
    out = tmp_path / "t.safetensors"
    code, stdout, err = run(capsys, "encode", imgs["a"], *bad, imgs["b"], "-m", ckpt, "-o", out, "-q")
    assert code == 1
    assert "wrote 2 image(s)" in stdout
    listing = err[err.index("skipped 4 file(s):"):].splitlines()[1:]
    assert len(listing) == 4 and all(str(p) in ln for p, ln in zip(sorted(bad), sorted(listing), strict=True))
    assert load_tokens(out).sources == [str(imgs["a"]), str(imgs["b"])]
    assert "vtok: error" not in err


def test_ctrl_c_exits_130_without_output(ckpt: Path, imgs: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_image", interrupt)
    code, _, err = run(capsys, "encode", imgs["a"], "-m", ckpt, "-o", tmp_path / "t.st")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(ckpt: Path, imgs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version")[0] == 0
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err
    code, _, err = run(capsys, "encode", imgs["a"], "-m", ckpt, "-o", tmp_path / "t", "--max-pixels", "lots")
    assert code == 2 and "not a pixel count" in err
    code, _, err = run(capsys, "encode", imgs["a"], "-m", ckpt, "-o", tmp_path)
    assert code == 2 and "is a directory" in error_line(err)
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "reconstruct", imgs["a"], "-m", ckpt, "--device", "cuda")
        assert code == 2 and "CUDA is not available" in error_line(err)
    assert cli._pixel_count("64M") == 64_000_000 and cli._pixel_count("none") is None


# --- token files ---------------------------------------------------------------------------------
def rewrite(src: Path, dst: Path, tensors: Any = None, meta: Any = None) -> Path:
    """Copy a token file, letting ``tensors(dict)`` / ``meta(dict)`` tamper with it."""
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    parsed = json.loads(header["vtok"])
    if tensors:
        tensors(data)
    if meta:
        meta(parsed)
    header["vtok"] = json.dumps(parsed)
    save_file(data, str(dst), metadata=header)
    return dst


@pytest.fixture
def token_file(ckpt: Path, imgs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "good.safetensors"
    assert run(capsys, "encode", imgs["a"], imgs["b"], "-m", ckpt, "-o", out, "-q")[0] == 0
    return out


def _ids_out_of_range(d: dict[str, torch.Tensor]) -> None:
    d["ids.1"][0, 0] = 700  # the tiny FSQ has 625 codes


def _grid_too_big(m: dict[str, Any]) -> None:
    m["items"][1]["grid"] = [9, 9]


def _drop_item(d: dict[str, torch.Tensor]) -> None:
    del d["ids.1"]


def _wrong_shape(d: dict[str, torch.Tensor]) -> None:
    d["ids.0"] = d["ids.0"][:, :-1].contiguous()


@pytest.mark.parametrize(
    ("tamper", "fragment"),
    [
        ({"tensors": _ids_out_of_range}, "item 1 "),
        ({"tensors": _ids_out_of_range}, "700] but the file's vocabulary has 625"),
        ({"meta": _grid_too_big}, "token grid 9x9 does not fit"),
        ({"tensors": _drop_item}, "tensor 'ids.1' is missing"),
        ({"tensors": _wrong_shape}, "ids have shape (6, 9), expected (6, 10)"),
        ({"meta": lambda m: m.update(format_version=99)}, "newer vtok"),
        ({"meta": lambda m: m["items"][0].update(size=[24, 40, 3])}, "wrong number of dimensions"),
        ({"meta": lambda m: m.pop("items")}, "lacks items"),
    ],
)
def test_tampered_token_files_fail_in_one_line(token_file: Path, ckpt: Path, tmp_path: Path, tamper: dict,
                                               fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = rewrite(token_file, tmp_path / "bad.safetensors", **tamper)
    code, _, err = run(capsys, "decode", bad, "-m", ckpt, "-o", tmp_path / "out")
    assert code == 2
    line = error_line(err)
    assert fragment in line and str(bad) in line
    assert not (tmp_path / "out").exists()


def test_corrupt_and_foreign_files_fail_in_one_line(token_file: Path, ckpt: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    blob = token_file.read_bytes()
    cases = {
        "cut.safetensors": (blob[: len(blob) - 40], "not a readable safetensors"),
        "noise.safetensors": (os.urandom(200), "not a readable safetensors"),
        "empty.safetensors": (b"", "not a readable safetensors"),
        "weights.safetensors": ((ckpt / "model.safetensors").read_bytes(), "not a vtok token file"),
    }
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
        code, _, err = run(capsys, "decode", tmp_path / name, "-m", ckpt, "-o", tmp_path / "out")
        assert code == 2 and fragment in error_line(err) and name in error_line(err), err
    code, _, err = run(capsys, "decode", tmp_path / "absent.safetensors", "-m", ckpt, "-o", tmp_path / "out")
    assert code == 2 and "no such file" in error_line(err)


def test_tokens_from_another_model(token_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny(channel_mult=[1, 2, 2, 2]).save_pretrained(str(tmp_path / "f8"))  # f=8: grids do not fit
    code, _, err = run(capsys, "decode", token_file, "-m", tmp_path / "f8", "-o", tmp_path / "out")
    assert code == 2 and "does not fit" in error_line(err) and "f=8" in error_line(err)
    tiny({"type": "fsq", "levels": [3, 3, 3, 3]}).save_pretrained(str(tmp_path / "small"))  # 81 codes
    code, _, err = run(capsys, "decode", token_file, "-m", tmp_path / "small", "-o", tmp_path / "out")
    assert code == 2 and "vocabulary has 81 entries" in error_line(err)
    tiny(channels=16).save_pretrained(str(tmp_path / "wide"))  # fits, but is another model: warn, decode
    code, _, err = run(capsys, "decode", token_file, "-m", tmp_path / "wide", "-o", tmp_path / "out")
    assert code == 0 and "warning" in err and "written by model" in err
    tiny({"type": "kl", "latent_channels": 4}).save_pretrained(str(tmp_path / "kl"))
    code, _, err = run(capsys, "decode", token_file, "-m", tmp_path / "kl", "-o", tmp_path / "out2")
    assert code == 2 and "continuous latents" in error_line(err)


def fake_info(codebook_size: int, num_codebooks: int = 1, sub: tuple[int, ...] | None = None) -> TokenizerInfo:
    subs = sub if sub is not None else (codebook_size,) * num_codebooks
    return TokenizerInfo(name="fake", token_kind="2d", downsample=(4, 4), continuous=False,
                         codebook_size=codebook_size, num_codebooks=num_codebooks, sub_vocab_sizes=subs,
                         bits_per_token=float(sum(math.log2(s) for s in subs)), latent_channels=4)


def test_token_file_format_dtypes_and_factorised_ids(tmp_path: Path) -> None:
    assert id_dtype_for(fake_info(32768)) == torch.int16
    assert id_dtype_for(fake_info(32769)) == torch.int32
    assert id_dtype_for(fake_info(64, 2, (64, 65536))) == torch.int32
    # Q = 2 ids per position with different vocabularies, two images of different sizes
    info = fake_info(4096, 2, (64, 4096))
    items = [
        TokenBatch(ids=torch.stack([torch.randint(0, 64, (1, 3, 5)), torch.randint(0, 4096, (1, 3, 5))], -1),
                   latents=None, grid=(3, 5), size=(9, 20)),
        TokenBatch(ids=torch.stack([torch.randint(0, 64, (1, 1, 2)), torch.randint(0, 4096, (1, 1, 2))], -1),
                   latents=None, grid=(1, 2), size=(1, 5)),
    ]
    path = save_tokens(tmp_path / "t.safetensors", items, ["x.png", "y.png"], info=info, model_id="fake")
    tf = load_tokens(path, info=info)
    assert [t.grid for t in tf.items] == [(3, 5), (1, 2)] and [t.size for t in tf.items] == [(9, 20), (1, 5)]
    for got, want in zip(tf.items, items, strict=True):
        assert got.ids.dtype == torch.int64 and torch.equal(got.ids, want.ids)
    assert tf.metadata["sub_vocab_sizes"] == [64, 4096] and tf.metadata["id_dtype"] == "int16"
    # slot 0 only has 64 entries: an id of 100 there is out of range even though 100 < 4096
    bad = TokenBatch(ids=items[0].ids.clone(), latents=None, grid=(3, 5), size=(9, 20))
    bad.ids[0, 0, 0, 0] = 100
    with pytest.raises(InputError, match=r"item 0 \(x.png\): token ids \(slot 0\) span"):
        save_tokens(tmp_path / "bad.safetensors", [bad], ["x.png"], info=info)
    assert not (tmp_path / "bad.safetensors").exists()
    assert config_hash({"name": "a", "encoder": {"c": 1}}) == config_hash({"name": "b", "encoder": {"c": 1}})


# --- the installed console script ----------------------------------------------------------------
def test_installed_console_script(ckpt: Path, imgs: dict[str, Path], tmp_path: Path) -> None:
    exe = shutil.which("vtok")
    if exe is None:
        pytest.skip("the vtok console script is not installed (pip install -e .)")
    out = tmp_path / "t.safetensors"
    proc = subprocess.run([exe, "encode", str(imgs["a"]), str(tmp_path / "missing.png"), "-m", str(ckpt),
                           "-o", str(out)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped 1 file(s):" in proc.stderr and "missing.png: no such file" in proc.stderr
    assert load_tokens(out).sources == [str(imgs["a"])]
