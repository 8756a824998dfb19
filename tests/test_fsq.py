"""FSQ: reachable levels, mixed-radix ids, oracle agreement (vector-quantize-pytorch) and the contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.errors import ConfigError
from vtok.quantizers.base import build_quantizer
from vtok.quantizers.fsq import FSQ


@pytest.mark.parametrize("level", [3, 4, 5, 6, 7, 8, 9, 16])
def test_exactly_l_values_are_reachable(level: int) -> None:
    q = FSQ([level])
    z = torch.linspace(-30, 30, 200_001)[None, None, :]
    out = q(z)
    half = level // 2
    expected = (torch.arange(level) - half).float() / half  # the grid as float32 values
    assert torch.equal(out.quantized.unique(), expected)
    assert sorted(out.indices.unique().tolist()) == list(range(level))
    assert q(torch.zeros(1, 1, 1)).quantized.item() == 0.0  # the shift keeps zero at zero for even L too
    # monotone: larger inputs never get a smaller level
    assert (out.indices.diff(dim=-1) >= 0).all()


def test_ids_are_mixed_radix_with_channel_0_most_significant() -> None:
    levels = [3, 4, 5]
    q = FSQ(levels)
    codes = q.indices_to_codes(torch.arange(60)[None])[0].T  # (60, 3)
    digits = q.indices_to_digits(torch.arange(60))
    assert digits.tolist() == [[a, b, c] for a in range(3) for b in range(4) for c in range(5)]
    half = torch.tensor([1, 2, 2])
    torch.testing.assert_close(codes, (digits - half).float() / half.float(), rtol=0, atol=0)
    assert len({tuple(c) for c in codes.tolist()}) == 60  # a bijection onto the grid


@settings(max_examples=30, deadline=None)
@given(levels=st.lists(st.integers(3, 9), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_digits_round_trip_and_forward_consistency(levels: list[int], seed: int) -> None:
    q = FSQ(levels)
    n = math.prod(levels)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (4, 7), generator=gen)
    digits = q.indices_to_digits(ids)
    assert (digits >= 0).all() and (digits < torch.tensor(levels)).all()
    assert torch.equal(q.digits_to_indices(digits), ids)
    z = torch.randn(2, len(levels), 3, generator=gen) * 3
    out = q(z)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < n
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)


@pytest.mark.parametrize("dim", [None, 7])
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 2)])
def test_contract_1d_2d_3d(shape: tuple[int, ...], dim: int | None) -> None:
    torch.manual_seed(0)
    levels = [8, 5, 5, 3]
    q = FSQ(levels, dim=dim)
    channels = dim or 4
    assert q.in_channels == q.out_channels == channels and q.codebook_size == 600
    assert q.num_codebooks == 1 and q.bits_per_token == pytest.approx(math.log2(600))
    z = (torch.randn(2, channels, *shape) * 2).requires_grad_(True)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (2, *shape) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 600
    assert out.losses == {} and float(out.loss) == 0.0
    assert {"usage", "perplexity"} <= set(out.stats)
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized.detach(), rtol=0, atol=1e-6)
    out.quantized.square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        ev = q(z)
    torch.testing.assert_close(q.indices_to_codes(ev.indices), ev.quantized, rtol=0, atol=1e-6)


def test_straight_through_gradient_is_the_bound_derivative() -> None:
    q = FSQ([5])
    z = torch.randn(1, 1, 9, requires_grad=True)
    q(z).quantized.sum().backward()
    half_l = 4 * 1.001 / 2
    expected = (1 - torch.tanh(z.detach()).square()) * half_l / 2  # d/dz [tanh(z)·h] / ⌊L/2⌋
    torch.testing.assert_close(z.grad, expected)


def test_get_config_round_trip() -> None:
    torch.manual_seed(1)
    q = FSQ([4, 4, 3], dim=6)
    cfg = q.get_config()
    assert cfg == {"type": "fsq", "levels": [4, 4, 3], "dim": 6}
    clone = build_quantizer(cfg)
    clone.load_state_dict(q.state_dict())
    z = torch.randn(2, 6, 3, 3)
    a, b = q(z), clone(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert set(q.state_dict()) == {"project_in.weight", "project_in.bias", "project_out.weight",
                                   "project_out.bias"}  # derived constants are not saved


def test_autocast_bf16_runs_in_fp32() -> None:
    torch.manual_seed(2)
    q = FSQ([5, 5, 5], dim=4)
    z = torch.randn(1, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        codes = q.indices_to_codes(out.indices)
    assert out.quantized.dtype == torch.float32 and codes.dtype == torch.float32
    assert torch.equal(out.indices, q(z.bfloat16().float()).indices)
    torch.testing.assert_close(codes, out.quantized, rtol=0, atol=1e-6)


def test_module_dtype_cast_keeps_integer_constants() -> None:
    q = FSQ([8, 5]).to(torch.float64)
    z = torch.randn(1, 2, 5)
    assert torch.equal(q(z).indices, FSQ([8, 5])(z).indices)


def test_config_errors() -> None:
    for bad in ([], [2, 5], [5, 1], [4.5, 3]):
        with pytest.raises(ConfigError, match="levels"):
            FSQ(bad)
    with pytest.raises(ConfigError, match="dim"):
        FSQ([5, 5], dim=0)


# --- oracle: vector-quantize-pytorch -----------------------------------------------------------------
def _oracle():
    return pytest.importorskip("vector_quantize_pytorch", reason="oracle for FSQ semantics (dev extra)")


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [3, 4, 6], [7, 7]])
def test_quantized_values_match_oracle(levels: list[int]) -> None:
    vqp = _oracle()
    torch.manual_seed(3)
    ours, oracle = FSQ(levels), vqp.FSQ(levels)
    z = torch.randn(2, len(levels), 6, 5) * 2
    out = ours(z)
    ref, ref_ids = oracle(z)
    torch.testing.assert_close(out.quantized, ref, rtol=0, atol=1e-6)
    # index relation: the oracle reads channel 0 as the LEAST significant digit, so our id for (levels, z)
    # is its id for the reversed levels on the channel-reversed input ...
    _, rev_ids = vqp.FSQ(levels[::-1])(z.flip(1))
    assert torch.equal(out.indices, rev_ids.long())
    # ... and equivalently the same digits read in the opposite order
    digits = ours.indices_to_digits(out.indices)
    oracle_radix = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    assert torch.equal((digits * oracle_radix).sum(-1), ref_ids.long())


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [3, 4, 6]])
def test_code_sets_and_index_mapping_match_oracle(levels: list[int]) -> None:
    vqp = _oracle()
    ours, oracle = FSQ(levels), vqp.FSQ(levels)
    n = math.prod(levels)
    assert ours.codebook_size == oracle.codebook_size == n
    ids = torch.arange(n)
    our_codes = ours.indices_to_codes(ids[None])[0].T  # (n, d)
    assert {tuple(c) for c in our_codes.tolist()} == {tuple(c) for c in oracle.implicit_codebook.tolist()}
    # reverse-radix permutation: our id i <-> the oracle id with the same digits read least-significant-first
    oracle_radix = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    perm = (ours.indices_to_digits(ids) * oracle_radix).sum(-1)
    assert sorted(perm.tolist()) == list(range(n))
    torch.testing.assert_close(our_codes, oracle.implicit_codebook[perm], rtol=0, atol=0)
