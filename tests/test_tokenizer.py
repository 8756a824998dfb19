"""The encode/decode contract, info, presets and checkpoints of the conv tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_tokenizer
from safetensors.torch import load_file, save_file

import vtok
from vtok.models.registry import PRESETS, model_from_config
from vtok.tokens import TokenBatch

TINY_QUANTIZERS = {
    "vq": {"type": "vq", "dim": 4, "codebook_size": 64},
    "vq-cosine-proj": {"type": "vq", "dim": 4, "codebook_size": 64, "codebook_dim": 2, "distance": "cosine"},
    "fsq": {"type": "fsq", "levels": [5, 5, 5, 5]},
    "lfq": {"type": "lfq", "dim": 4},
    "bsq": {"type": "bsq", "dim": 4},
    "ibq": {"type": "ibq", "dim": 4, "codebook_size": 64},
    "residual": {"type": "residual", "num_quantizers": 3, "quantizer": {"type": "vq", "dim": 4, "codebook_size": 16}},
    "grouped": {"type": "grouped", "groups": 2, "quantizer": {"type": "fsq", "levels": [4, 4]}},
    "kl": {"type": "kl", "latent_channels": 3},
}


@pytest.mark.parametrize("family", sorted(TINY_QUANTIZERS))
@pytest.mark.parametrize("size", [(32, 32), (37, 29), (5, 3)])
def test_round_trip_shapes_at_odd_sizes(family: str, size: tuple[int, int]) -> None:
    tok = tiny_tokenizer(TINY_QUANTIZERS[family])
    images = torch.rand(2, 3, *size)
    tokens = tok.encode(images)
    grid = tuple(math.ceil(s / 4) for s in size)
    assert tokens.grid == grid == tok.info.grid_for(size)
    assert tokens.size == size
    if tok.info.continuous:
        assert tokens.ids is None and tokens.latents.shape == (2, tok.info.latent_channels, *grid)
    else:
        q = tok.info.num_codebooks
        assert tokens.ids.dtype == torch.int64
        assert tokens.ids.shape == ((2, *grid) if q == 1 else (2, *grid, q))
        assert 0 <= int(tokens.ids.min()) and int(tokens.ids.max()) < tok.info.codebook_size
    out = tok.decode(tokens)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    fwd = tok(images)
    assert fwd.reconstruction.shape == images.shape
    assert all(torch.isfinite(v) for v in fwd.losses.values())
    # eval-mode forward and decode(encode) agree (decode clamps)
    torch.testing.assert_close(fwd.reconstruction.clamp(0, 1), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(TINY_QUANTIZERS))
def test_gradients_reach_encoder_through_quantizer(family: str) -> None:
    tok = tiny_tokenizer(TINY_QUANTIZERS[family]).train()
    out = tok(torch.rand(2, 3, 16, 16))
    ((out.reconstruction - 0.5).square().mean() + out.quantizer.loss).backward()
    grad = tok.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(TINY_QUANTIZERS))
def test_save_load_bit_identical(tmp_path, family: str) -> None:
    tok = tiny_tokenizer(TINY_QUANTIZERS[family])
    images = torch.rand(2, 3, 20, 28)
    tok.save_pretrained(str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = vtok.load(tmp_path / "ckpt")
    assert loaded.get_config() == tok.get_config()
    with torch.no_grad():
        a, b = tok.encode(images), loaded.encode(images)
        if a.ids is not None:
            assert torch.equal(a.ids, b.ids)
        else:
            assert torch.equal(a.latents, b.latents)
        assert torch.equal(tok.decode(a), loaded.decode(b))


def test_info_reports_bits_and_vocab() -> None:
    tok = tiny_tokenizer({"type": "fsq", "levels": [8, 5, 5, 5]})
    info = tok.info
    assert info.downsample == (4, 4) and info.codebook_size == 1000 == info.vocab_size
    assert info.bits_per_token == pytest.approx(math.log2(1000))
    assert info.bits_per_pixel((64, 64)) == pytest.approx(math.log2(1000) / 16)
    assert info.value_range == (0.0, 1.0) and info.token_kind == "2d"
    rvq = tiny_tokenizer(TINY_QUANTIZERS["residual"]).info
    assert rvq.num_codebooks == 3 and rvq.sub_vocab_sizes == (16, 16, 16)
    assert rvq.bits_per_token == pytest.approx(12.0)
    assert math.prod(rvq.sub_vocab_sizes) == 2 ** rvq.bits_per_token


def test_patch_size_adds_to_downsample() -> None:
    tok = tiny_tokenizer(TINY_QUANTIZERS["fsq"], patch_size=2)
    assert tok.info.downsample == (8, 8)
    tokens = tok.encode(torch.rand(1, 3, 33, 17))
    assert tokens.grid == (5, 3)
    assert tok.decode(tokens).shape == (1, 3, 33, 17)


def test_every_preset_builds_and_declares_info() -> None:
    shrink = {"channels": 8, "num_res_blocks": 0}
    for name, preset in PRESETS.items():
        tok = vtok.create(name, encoder=shrink)
        info = tok.info
        f = 2 ** (len(preset.config["encoder"]["channel_mult"]) - 1)
        assert info.downsample == (f, f), name
        assert info.name == name
        if not info.continuous:
            assert info.bits_per_token > 0
            assert math.prod(info.sub_vocab_sizes) == pytest.approx(2 ** info.bits_per_token, rel=1e-9)
        with torch.no_grad():
            tokens = tok.encode(torch.rand(1, 3, 2 * f + 1, f))
            assert tok.decode(tokens).shape == (1, 3, 2 * f + 1, f)


def test_llamagen_preset_has_8d_codes_and_18_bit_lfq() -> None:
    assert PRESETS["vq-f8-16k"].config["quantizer"]["codebook_dim"] == 8
    lfq = vtok.create("lfq-f16-18b", encoder={"channels": 8, "num_res_blocks": 0})
    assert lfq.info.codebook_size == 2**18 and lfq.info.sub_vocab_sizes == (64, 4096)


def test_decode_rejects_bad_tokens(tiny_fsq) -> None:
    tokens = tiny_fsq.encode(torch.rand(1, 3, 16, 16))
    bad_ids = TokenBatch(ids=tokens.ids + 10_000, latents=None, grid=tokens.grid, size=tokens.size)
    with pytest.raises(vtok.InputError, match="codebook has 625"):
        tiny_fsq.decode(bad_ids)
    with pytest.raises(vtok.InputError, match="does not fit"):
        tiny_fsq.decode(TokenBatch(ids=tokens.ids, latents=None, grid=tokens.grid, size=(64, 64)))
    with pytest.raises(vtok.InputError, match="expected"):
        tiny_fsq.decode(TokenBatch(ids=tokens.ids, latents=None, grid=(2, 8), size=(8, 32)))
    with pytest.raises(vtok.InputError, match="needs ids"):
        tiny_fsq.decode(TokenBatch(ids=None, latents=torch.zeros(1, 4, 4, 4), grid=(4, 4), size=(16, 16)))


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(3, 16, 16), "shape"),
        (torch.rand(1, 1, 16, 16), "shape"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "float"),
        (torch.rand(0, 3, 16, 16), "non-empty"),
    ],
)
def test_encode_rejects_bad_images(tiny_fsq, images, match: str) -> None:
    with pytest.raises(vtok.InputError, match=match):
        tiny_fsq.encode(images)


def test_token_batch_carries_1d_and_3d_grids() -> None:
    seq = TokenBatch(ids=torch.zeros(2, 32, dtype=torch.long), latents=None, grid=(32,), size=(256, 256))
    video = TokenBatch(ids=None, latents=torch.zeros(2, 4, 3, 8, 8), grid=(3, 8, 8), size=(9, 64, 64))
    assert seq.grid == (32,) and seq.discrete and len(seq) == 2
    assert video.grid == (3, 8, 8) and not video.discrete and video[1].latents.shape[0] == 1
    with pytest.raises(ValueError):
        TokenBatch(ids=None, latents=None, grid=(1,), size=(1,))


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path, tiny_fsq) -> None:
    ckpt = tmp_path / "ckpt"
    tiny_fsq.save_pretrained(str(ckpt))
    state = load_file(str(ckpt / "model.safetensors"))
    state["decoder.conv_out.weight"] = torch.zeros(3, 8, 1, 1)
    del state["encoder.conv_in.bias"]
    state["stray.weight"] = torch.zeros(1)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(vtok.CheckpointError) as err:
        vtok.load(ckpt)
    msg = str(err.value)
    assert "encoder.conv_in.bias" in msg and "stray.weight" in msg
    assert "decoder.conv_out.weight: checkpoint (3, 8, 1, 1) vs config (3, 8, 3, 3)" in msg


def test_config_mismatch_is_reported(tmp_path, tiny_fsq) -> None:
    ckpt = tmp_path / "ckpt"
    tiny_fsq.save_pretrained(str(ckpt))
    config = json.loads((ckpt / "config.json").read_text())
    config["encoder"]["channels"] = 16
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(vtok.CheckpointError, match="shape mismatches"):
        vtok.load(ckpt)


def test_broken_checkpoint_files(tmp_path, tiny_fsq) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(vtok.ConfigError, match="no such checkpoint folder"):
        vtok.load(str(ckpt))
    tiny_fsq.save_pretrained(str(ckpt))
    (ckpt / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(vtok.CheckpointError, match="not a readable safetensors"):
        vtok.load(ckpt)
    (ckpt / "config.json").write_text("{broken")
    with pytest.raises(vtok.CheckpointError, match="not valid JSON"):
        vtok.load(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(vtok.CheckpointError, match="missing"):
        vtok.load(ckpt)


def test_registry_errors_name_close_matches() -> None:
    with pytest.raises(vtok.ConfigError, match="did you mean vq-f8-16k"):
        vtok.create("vq-f8-16")
    with pytest.raises(vtok.ConfigError, match="preset without trained weights"):
        vtok.load("vq-f8-16k")
    with pytest.raises(vtok.ConfigError, match="unknown quantizer type 'vqq'"):
        vtok.Tokenizer(quantizer={"type": "vqq"})
    with pytest.raises(vtok.ConfigError, match="unknown option"):
        vtok.build_quantizer({"type": "fsq", "levels": [3, 3], "bogus": 1})
    with pytest.raises(vtok.ConfigError, match="unknown conv option"):
        vtok.Tokenizer(encoder={"chanels": 8}, quantizer={"type": "fsq", "levels": [3]})
    with pytest.raises(vtok.ConfigError, match="unknown architecture"):
        model_from_config({"architecture": "nope"})


def test_create_merges_nested_overrides() -> None:
    tok = vtok.create("vq-f8-16k", encoder={"channels": 8, "num_res_blocks": 0}, quantizer={"codebook_size": 32})
    assert tok.quantizer.codebook_size == 32
    assert tok.quantizer.get_config()["codebook_dim"] == 8
    assert tok.encoder.cfg.channel_mult == (1, 2, 2, 4)


def test_create_with_seed_is_reproducible_and_leaves_global_rng_alone() -> None:
    shrink = {"encoder": {"channels": 8, "num_res_blocks": 0}}
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = vtok.create("fsq-f8-64k", seed=7, **shrink)
    assert torch.equal(torch.rand(1), before)
    b = vtok.create("fsq-f8-64k", seed=7, **shrink)
    c = vtok.create("fsq-f8-64k", seed=8, **shrink)
    assert torch.equal(a.encoder.conv_in.weight, b.encoder.conv_in.weight)
    assert not torch.equal(a.encoder.conv_in.weight, c.encoder.conv_in.weight)


def test_codebook_stats_match_hand_computed_values() -> None:
    from vtok.quantizers.base import codebook_stats

    ids = torch.tensor([[0, 0, 1, 3]])  # p = (1/2, 1/4, 1/4) over 3 of 8 codes
    stats = codebook_stats(ids, codebook_size=8)
    assert stats["usage"].item() == pytest.approx(3 / 8)
    assert stats["perplexity"].item() == pytest.approx(2 ** 1.5)
    two = codebook_stats(torch.tensor([[[0, 5], [1, 5]]]), codebook_size=2**40, num_codebooks=2)
    assert two["usage"].item() == pytest.approx((2 + 1) / 2 / 2**40)
    assert two["perplexity"].item() == pytest.approx((2 + 1) / 2)


def test_overriding_the_quantizer_type_replaces_its_options() -> None:
    tok = vtok.create("vq-f8-16k", encoder={"channels": 8, "num_res_blocks": 0},
                      quantizer={"type": "fsq", "levels": [5, 5]})
    assert tok.quantizer.get_config() == {"type": "fsq", "levels": [5, 5], "dim": None}
