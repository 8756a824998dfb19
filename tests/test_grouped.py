"""Grouped (product) quantization over vq / fsq / ibq bases: contract and group independence."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.errors import ConfigError
from vtok.quantizers.base import build_quantizer
from vtok.quantizers.grouped import GroupedQuantizer

BASES: dict[str, dict[str, Any]] = {
    "vq": {"type": "vq", "dim": 3, "codebook_size": 16},
    "fsq": {"type": "fsq", "levels": [4, 4, 3]},
    "ibq": {"type": "ibq", "dim": 3, "codebook_size": 16, "chunk_size": 5},
}


def grouped(base: str, groups: int = 4, shared: bool = False) -> GroupedQuantizer:
    torch.manual_seed(0)
    return GroupedQuantizer(quantizer=BASES[base], groups=groups, shared_codebook=shared)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("spatial", [(6,), (3, 4), (2, 2, 3)])
def test_contract(base: str, spatial: tuple[int, ...]) -> None:
    gq = grouped(base, 4)
    assert gq.in_channels == gq.out_channels == 12 and gq.num_codebooks == 4
    assert gq.sub_vocab_sizes == (gq.codebook_size,) * 4
    z = torch.randn(2, 12, *spatial, requires_grad=True)
    out = gq(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (2, *spatial, 4) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < gq.codebook_size
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert {"usage", "perplexity"} <= set(out.stats)
    (out.quantized.square().sum() + out.loss).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    gq.eval()
    with torch.no_grad():
        ev = gq(z)
    codes = gq.indices_to_codes(ev.indices)
    torch.testing.assert_close(codes, ev.quantized, rtol=0, atol=1e-6)
    # same memory layout on both paths, so a decoder conv rounds both the same way
    assert codes.is_contiguous() and ev.quantized.is_contiguous()


@pytest.mark.parametrize("base", sorted(BASES))
def test_each_group_is_its_base_on_its_slice(base: str) -> None:
    gq = grouped(base, 3).eval()
    z = torch.randn(2, 9, 4)
    with torch.no_grad():
        out = gq(z)
        for g in range(3):
            part = gq.group(g)(z[:, 3 * g : 3 * g + 3])
            assert torch.equal(out.indices[..., g], part.indices)
            torch.testing.assert_close(out.quantized[:, 3 * g : 3 * g + 3], part.quantized, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(group=st.integers(0, 3), seed=st.integers(0, 2**16), shared=st.booleans(),
       base=st.sampled_from(["vq", "fsq"]))
def test_groups_are_independent(group: int, seed: int, shared: bool, base: str) -> None:
    """Changing one group's channels changes only that group's ids."""
    gq = grouped(base, 4, shared).eval()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 12, 5, generator=gen)
    z2 = z.clone()
    z2[:, 3 * group : 3 * group + 3] = torch.randn(2, 3, 5, generator=gen) * 3
    with torch.no_grad():
        a, b = gq(z).indices, gq(z2).indices
    others = [g for g in range(4) if g != group]
    assert torch.equal(a[..., others], b[..., others])
    assert not torch.equal(a[..., group], b[..., group])


def test_shared_codebook_means_identical_ids_for_identical_slices() -> None:
    gq = grouped("vq", 3, shared=True).eval()
    assert len(gq.members) == 1
    part = torch.randn(2, 3, 5)
    with torch.no_grad():
        idx = gq(torch.cat([part, part, part], dim=1)).indices
    assert torch.equal(idx[..., 0], idx[..., 1]) and torch.equal(idx[..., 0], idx[..., 2])


def test_losses_are_group_means() -> None:
    gq = grouped("ibq", 2).eval()
    z = torch.randn(2, 6, 4)
    out = gq(z)
    parts = [gq.group(g)(z[:, 3 * g : 3 * g + 3]) for g in range(2)]
    for k in out.losses:
        torch.testing.assert_close(out.losses[k], (parts[0].losses[k] + parts[1].losses[k]) / 2)


def test_errors() -> None:
    with pytest.raises(ConfigError):
        GroupedQuantizer(quantizer=BASES["fsq"], groups=0)
    with pytest.raises(ConfigError, match="continuous"):
        GroupedQuantizer(quantizer={"type": "kl", "latent_channels": 2}, groups=2)
    with pytest.raises(ValueError):
        grouped("fsq", 2)(torch.randn(1, 5, 3))
    with pytest.raises(ValueError):
        grouped("fsq", 2).indices_to_codes(torch.zeros(1, 3, 3, dtype=torch.long))


def test_autocast_fp32() -> None:
    gq = grouped("vq", 2).eval()
    z = torch.randn(1, 6, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gq(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, gq(z).indices)


@pytest.mark.parametrize("base", sorted(BASES))
def test_config_round_trip(base: str) -> None:
    gq = grouped(base, 2, shared=True)
    cfg = gq.get_config()
    assert cfg == {"type": "grouped", "quantizer": BASES[base], "groups": 2, "shared_codebook": True}
    again = build_quantizer(cfg)
    assert isinstance(again, GroupedQuantizer) and again.get_config() == cfg
    again.load_state_dict(gq.state_dict())
    z = torch.randn(2, 6, 3)
    assert torch.equal(again.eval()(z).indices, gq.eval()(z).indices)
