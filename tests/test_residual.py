"""Residual quantization over vq / fsq / ibq bases: contract, prefix decoding, refinement, dropout."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from vtok.errors import ConfigError
from vtok.quantizers.base import QUANTIZERS, Quantizer, QuantizerOutput, build_quantizer
from vtok.quantizers.residual import ResidualQuantizer

BASES: dict[str, dict[str, Any]] = {
    "vq": {"type": "vq", "dim": 4, "codebook_size": 16},
    "fsq": {"type": "fsq", "levels": [5, 5, 5, 5]},
    "ibq": {"type": "ibq", "dim": 4, "codebook_size": 16, "chunk_size": 5},
}


def residual(base: str, q: int = 3, **kw: Any) -> ResidualQuantizer:
    torch.manual_seed(0)
    return ResidualQuantizer(quantizer=BASES[base], num_quantizers=q, **kw)


def codebook_param(level: Quantizer) -> Tensor:
    """The ``(K, dim)`` code table of a codebook base, whatever the family names it."""
    shape = (level.codebook_size, level.in_channels)
    return next(p for p in level.parameters() if tuple(p.shape) == shape)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 2, 3)])
def test_contract(base: str, spatial: tuple[int, ...]) -> None:
    rq = residual(base, 3)
    assert rq.num_codebooks == 3 and rq.in_channels == rq.out_channels == 4
    assert rq.codebook_size == rq.level(0).codebook_size
    assert rq.bits_per_token == pytest.approx(3 * rq.level(0).bits_per_token)
    z = torch.randn(2, 4, *spatial, requires_grad=True)
    out = rq(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (2, *spatial, 3) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < rq.codebook_size
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert {"usage", "perplexity"} <= set(out.stats)
    (out.quantized.square().sum() + out.loss).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    rq.eval()
    with torch.no_grad():
        ev = rq(z)
    codes = rq.indices_to_codes(ev.indices)
    torch.testing.assert_close(codes, ev.quantized, rtol=0, atol=1e-5)
    # same memory layout on both paths, so a decoder conv rounds both the same way
    assert codes.is_contiguous() and ev.quantized.is_contiguous()


def test_identity_straight_through_bases_pass_gradient_unchanged() -> None:
    """r_{l+1} = r_l − q_l: a stack of identity-STE levels (VQ) is one identity in the backward pass."""
    rq = residual("vq", 3)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    weights = torch.randn_like(z)
    (rq(z).quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)


def test_losses_are_summed_over_levels() -> None:
    rq = residual("ibq", 3).eval()
    z = torch.randn(2, 4, 5)
    out = rq(z)
    expected: dict[str, Tensor] = {}
    r = z
    for i in range(3):
        o = rq.level(i)(r)
        r = r - o.quantized
        for k, v in o.losses.items():
            expected[k] = expected.get(k, 0.0) + v
    assert set(out.losses) == set(expected)
    for k in expected:
        torch.testing.assert_close(out.losses[k], expected[k])


@settings(max_examples=12, deadline=None)
@given(depth=st.integers(1, 4), shared=st.booleans(), seed=st.integers(0, 2**16), base=st.sampled_from(["vq", "fsq"]))
def test_prefix_decoding_equals_shallower_stack(depth: int, shared: bool, seed: int, base: str) -> None:
    """Decoding the first q levels of Q == running a Q=q stack with the same first q levels."""
    deep = residual(base, 4, shared_codebook=shared).eval()
    shallow = ResidualQuantizer(quantizer=BASES[base], num_quantizers=depth, shared_codebook=shared).eval()
    state = {k: v for k, v in deep.state_dict().items() if shared or int(k.split(".")[1]) < depth}
    shallow.load_state_dict(state)
    z = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(seed)) * 2
    with torch.no_grad():
        full = deep(z)
        prefix = deep.indices_to_codes(full.indices[..., :depth])
        short = shallow(z)
    assert torch.equal(full.indices[..., :depth], short.indices)
    torch.testing.assert_close(prefix, short.quantized, rtol=0, atol=1e-5)


def _data_initialised(depth: int, shared: bool = False) -> tuple[ResidualQuantizer, Tensor]:
    """A euclidean-VQ stack whose level-l codebook is drawn from level-l residuals, plus a zero code."""
    torch.manual_seed(1)
    rq = ResidualQuantizer(quantizer=BASES["vq"], num_quantizers=depth, shared_codebook=shared).eval()
    data = torch.randn(8, 4, 16)
    r = data
    with torch.no_grad():
        for i in range(depth):
            table = codebook_param(rq.level(i))
            rows = r.movedim(1, -1).reshape(-1, 4)
            table.copy_(rows[torch.randperm(rows.shape[0])[: table.shape[0]]])
            table[0] = 0.0
            r = r - rq.level(i)(r).quantized
    return rq, data


def test_each_level_reduces_error_with_data_initialised_codebooks() -> None:
    rq, data = _data_initialised(4)
    with torch.no_grad():
        idx = rq(data).indices
        errors = [(data - rq.indices_to_codes(idx[..., :q])).square().mean().item() for q in range(1, 5)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 5.0))
def test_residual_norm_never_grows_per_position(seed: int, scale: float) -> None:
    """With a zero code in each euclidean codebook, every level can only shrink each residual."""
    rq, _ = _data_initialised(4)
    z = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed)) * scale
    with torch.no_grad():
        idx = rq(z).indices
        norms = [(z - rq.indices_to_codes(idx[..., :q])).norm(dim=1) for q in range(1, 5)]
    norms = [z.norm(dim=1), *norms]
    for a, b in itertools.pairwise(norms):
        assert (b <= a + 1e-5).all()


def test_dropout_only_in_training_and_keeps_prefixes() -> None:
    rq = residual("vq", 4, quantizer_dropout=1.0, dropout_min_levels=2)
    z = torch.randn(64, 4, 3)
    torch.manual_seed(2)
    out = rq.train()(z)
    kept = []
    for b in range(64):
        matches = [
            q for q in range(1, 5)
            if torch.allclose(rq.indices_to_codes(out.indices[b : b + 1, ..., :q]), out.quantized[b : b + 1],
                              atol=1e-5)
        ]
        assert matches, f"item {b} is not a prefix sum"
        kept.append(max(matches))
    assert min(kept) >= 2 and len(set(kept)) > 1
    rq.eval()
    with torch.no_grad():
        ev = rq(z)
    torch.testing.assert_close(rq.indices_to_codes(ev.indices), ev.quantized, rtol=0, atol=1e-5)
    assert torch.equal(ev.indices, out.indices)


def test_no_dropout_when_probability_zero() -> None:
    rq = residual("fsq", 3).train()
    z = torch.randn(16, 4, 2)
    out = rq(z)
    torch.testing.assert_close(rq.indices_to_codes(out.indices), out.quantized, rtol=0, atol=1e-5)


def test_shared_codebook_has_one_module() -> None:
    rq = residual("vq", 5, shared_codebook=True)
    assert len(rq.levels) == 1 and rq.level(4) is rq.level(0)
    assert sum(p.numel() for p in rq.parameters()) == sum(p.numel() for p in rq.level(0).parameters())


def test_bad_prefix_shapes() -> None:
    rq = residual("fsq", 2)
    with pytest.raises(ValueError):
        rq.indices_to_codes(torch.zeros(1, 3, 3, dtype=torch.long))


class Mismatched(Quantizer):
    """A discrete base whose output width differs from its input width (for the error message)."""

    type_name = "mismatched"

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.codebook_size = dim, dim + 1, 2

    def forward(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - never called
        raise NotImplementedError


def test_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(QUANTIZERS, "mismatched", f"{__name__}:Mismatched")
    with pytest.raises(ConfigError, match="in_channels == out_channels"):
        ResidualQuantizer(quantizer={"type": "mismatched"}, num_quantizers=2)
    with pytest.raises(ConfigError, match="continuous"):
        ResidualQuantizer(quantizer={"type": "kl", "latent_channels": 2}, num_quantizers=2)
    with pytest.raises(ConfigError, match="index slots"):
        ResidualQuantizer(quantizer={"type": "grouped", "groups": 2, "quantizer": BASES["fsq"]}, num_quantizers=2)
    with pytest.raises(ConfigError):
        residual("fsq", 0)
    with pytest.raises(ConfigError):
        residual("fsq", 3, dropout_min_levels=4)
    with pytest.raises(ConfigError):
        residual("fsq", 3, quantizer_dropout=1.5)


def test_autocast_fp32() -> None:
    rq = residual("vq", 2).eval()
    z = torch.randn(1, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rq(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, rq(z).indices)


@pytest.mark.parametrize("base", sorted(BASES))
def test_config_round_trip(base: str) -> None:
    rq = residual(base, 3, shared_codebook=True, quantizer_dropout=0.5, dropout_min_levels=2)
    cfg = rq.get_config()
    assert cfg == {"type": "residual", "quantizer": BASES[base], "num_quantizers": 3, "shared_codebook": True,
                   "quantizer_dropout": 0.5, "dropout_min_levels": 2}
    again = build_quantizer(cfg)
    assert isinstance(again, ResidualQuantizer) and again.get_config() == cfg
    again.load_state_dict(rq.state_dict())
    z = torch.randn(2, 4, 3)
    assert torch.equal(again.eval()(z).indices, rq.eval()(z).indices)
