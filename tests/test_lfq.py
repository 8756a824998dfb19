"""LFQ: exact entropy against brute force over all codes, chunking, sub-tokens, oracle and the contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.errors import ConfigError
from vtok.quantizers.base import build_quantizer
from vtok.quantizers.lfq import LFQ, binary_entropies, bits_to_ids, ids_to_bits, merge_ids, split_ids


def all_codes(k: int, scale: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(2^k, k)`` codes in id order (channel 0 = most significant bit)."""
    bits = ids_to_bits(torch.arange(2**k), k)
    return torch.where(bits, torch.tensor(scale, dtype=dtype), torch.tensor(-scale, dtype=dtype))


def brute_entropies(z: torch.Tensor, scale: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the ``N × 2^K`` softmax of ``-||z − c||² / T`` and take both entropies directly."""
    codes = all_codes(z.shape[1], scale, z.dtype)
    sq_dist = (z[:, None, :] - codes[None, :, :]).square().sum(-1)
    probs = (-sq_dist / temperature).softmax(dim=1)
    sample = -torch.xlogy(probs, probs).sum(dim=1).mean()
    mean = probs.mean(dim=0)
    return sample, -torch.xlogy(mean, mean).sum()


@pytest.mark.parametrize(("scale", "temperature", "spread"), [(1.0, 0.01, 1.0), (1.0, 1.0, 0.5), (0.5, 0.3, 1.0)])
def test_exact_entropy_matches_brute_force_k10(scale: float, temperature: float, spread: float) -> None:
    torch.manual_seed(0)
    z = torch.randn(300, 10, dtype=torch.float64) * spread
    z[:40] *= 0.01  # near the decision boundaries: soft per-sample distributions
    ref_sample, ref_batch = brute_entropies(z, scale, temperature)
    sample, batch = binary_entropies(z, scale, temperature, "exact", chunk_size=2**10)
    torch.testing.assert_close(sample, ref_sample, rtol=0, atol=1e-10)
    torch.testing.assert_close(batch, ref_batch, rtol=0, atol=1e-10)
    sample32, batch32 = binary_entropies(z.float(), scale, temperature, "exact")  # what the module runs
    assert abs(float(sample32) - float(ref_sample)) < 1e-5
    assert abs(float(batch32) - float(ref_batch)) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 100, 1000, 2**20])
def test_chunked_equals_unchunked(chunk_size: int) -> None:
    torch.manual_seed(1)
    z0 = torch.randn(64, 11, dtype=torch.float64) * 0.3

    def run(chunk: int) -> tuple[torch.Tensor, ...]:
        z = z0.clone().requires_grad_(True)
        s, b = binary_entropies(z, 1.0, 0.5, "exact", chunk)
        (0.3 * s - 0.7 * b).backward()
        return s.detach(), b.detach(), z.grad

    for got, ref in zip(run(chunk_size), run(2**11), strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_chunked_equals_single_block_at_18_bits() -> None:
    torch.manual_seed(10)
    z0 = torch.randn(256, 18, dtype=torch.float64) * 0.02  # soft enough that many of the 2^18 codes carry mass
    results = []
    for chunk in (2**18, 2**12):  # one block of 512 × 512 vs 64 blocks of 8 × 512
        z = z0.clone().requires_grad_(True)
        s, b = binary_entropies(z, 1.0, 0.01, "exact", chunk)
        (s - b).backward()
        results.append((b.detach(), z.grad))
    assert float(results[0][0]) > 5.0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [2**8, 16])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_exact_entropy_gradients_match_brute_force_k8(temperature: float, chunk_size: int) -> None:
    torch.manual_seed(2)
    z0 = torch.randn(50, 8, dtype=torch.float64) * 0.4
    grads = []
    for fn in (lambda z: binary_entropies(z, 0.8, temperature, "exact", chunk_size),
               lambda z: brute_entropies(z, 0.8, temperature)):
        z = z0.clone().requires_grad_(True)
        s, b = fn(z)
        (1.3 * s - 0.9 * b).backward()
        grads.append(z.grad)
    assert grads[1].abs().max() > 1e-3  # the comparison is not between two zeros
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_chunked_backward_saves_no_full_distribution() -> None:
    """With several chunks, nothing of size 2^K is kept for backward (blocks are recomputed)."""
    k, n = 16, 64  # A and B are n × 2^8 = 2^14 entries; the full batch-mean distribution is 2^16
    z = torch.randn(n, k, requires_grad=True)
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, b = binary_entropies(z, 1.0, 0.5, "exact", chunk_size=2**10)
    assert max(sizes) < 2**k
    (s - b).backward()
    assert torch.isfinite(z.grad).all()
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        binary_entropies(z, 1.0, 0.5, "exact", chunk_size=2**16)  # one block: it is saved, as expected
    assert max(sizes) == 2**k


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 9), temperature=st.sampled_from([0.01, 0.3, 1.0, 5.0]),
       n=st.integers(1, 40))
def test_factorized_upper_bounds_exact(seed: int, k: int, temperature: float, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) * 0.5
    s_exact, b_exact = binary_entropies(z, 1.0, temperature, "exact")
    s_fact, b_fact = binary_entropies(z, 1.0, temperature, "factorized")
    assert torch.equal(s_exact, s_fact)  # the per-sample distribution factorises exactly
    assert float(b_fact) >= float(b_exact) - 1e-10
    if k == 1:
        torch.testing.assert_close(b_fact, b_exact)


def test_factorized_is_strictly_looser_on_correlated_bits() -> None:
    z = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])  # bits perfectly correlated: exact ln 2, factorized 2 ln 2
    _, exact = binary_entropies(z, 1.0, 0.01, "exact")
    _, fact = binary_entropies(z, 1.0, 0.01, "factorized")
    torch.testing.assert_close(exact, torch.tensor(0.6931472))
    torch.testing.assert_close(fact, torch.tensor(2 * 0.6931472))


# --- ids and sub-tokens ----------------------------------------------------------------------------
def test_id_is_bit_pattern_with_channel_0_most_significant() -> None:
    q = LFQ(dim=5)
    z = -torch.ones(1, 5, 3)
    z[0, 0, 0] = 1.0  # only channel 0 positive -> 2^4
    z[0, 4, 1] = 1.0  # only channel 4 positive -> 1
    z[0, :, 2] = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])  # 0b10110
    assert q(z).indices.tolist() == [[16, 1, 22]]
    assert q(torch.zeros(1, 5, 1)).indices.item() == 0  # exactly zero counts as negative


@settings(max_examples=30, deadline=None)
@given(parts=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_sub_token_split_merge_round_trip(parts: list[int], seed: int) -> None:
    total = sum(parts)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2**total, (3, 5), generator=gen)
    split = split_ids(ids, parts)
    assert split.shape == (3, 5, len(parts))
    for j, b in enumerate(parts):
        assert 0 <= int(split[..., j].min()) and int(split[..., j].max()) < 2**b
    assert torch.equal(merge_ids(split, parts), ids)
    bits = ids_to_bits(ids, total)
    assert torch.equal(bits_to_ids(bits), ids)


def test_open_magvit2_6_12_split_semantics() -> None:
    q = LFQ(dim=18, sub_token_bits=[6, 12])
    assert q.codebook_size == 2**18 and q.num_codebooks == 1 and q.bits_per_token == 18
    assert q.sub_vocab_sizes == (64, 4096)
    torch.manual_seed(3)
    z = torch.randn(2, 18, 4, 4)
    out = q(z)
    parts = q.split_indices(out.indices)
    assert parts.shape == (2, 4, 4, 2)
    assert torch.equal(parts[..., 0], out.indices >> 12)  # first sub-token = top 6 bits
    assert torch.equal(parts[..., 1], out.indices & 4095)
    assert torch.equal(parts[..., 0], bits_to_ids(z[:, :6].movedim(1, -1) > 0))  # = signs of channels 0..5
    assert torch.equal(q.merge_indices(parts), out.indices)
    plain = LFQ(dim=6)
    assert plain.sub_vocab_sizes == (64,) and plain.split_indices(torch.tensor([5])).tolist() == [[5]]


# --- the quantizer contract -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "factorized"])
@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 4), (1, 6, 2, 3, 2)])
def test_contract_1d_2d_3d(shape: tuple[int, ...], mode: str) -> None:
    torch.manual_seed(4)
    q = LFQ(dim=6, entropy_mode=mode, chunk_size=8, codebook_scale=0.5)
    z = torch.randn(*shape, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (shape[0], *shape[2:]) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 64
    assert set(out.quantized.detach().abs().unique().tolist()) == {0.5}
    assert set(out.losses) == {"commitment", "entropy"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert {"usage", "perplexity", "sample_entropy", "codebook_entropy"} <= set(out.stats)
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized.detach(), rtol=0, atol=1e-6)
    out.quantized.mul(torch.randn_like(z)).sum().backward()  # straight-through: dq/dz = identity
    assert z.grad is not None and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        ev = q(z)
    assert torch.equal(q.indices_to_codes(ev.indices), ev.quantized)
    assert set(ev.losses) == {"commitment"}  # the entropy penalty is a training term


def test_straight_through_gradient_is_identity() -> None:
    q = LFQ(dim=4, entropy_weight=0.0, commitment_weight=0.0)
    z = torch.randn(3, 4, 5, requires_grad=True)
    w = torch.randn(3, 4, 5)
    (q(z).quantized * w).sum().backward()
    torch.testing.assert_close(z.grad, w)


def test_losses_match_their_definition() -> None:
    torch.manual_seed(5)
    q = LFQ(dim=7, entropy_weight=0.3, commitment_weight=0.6, diversity_weight=1.7, temperature=0.2,
            codebook_scale=2.0)
    z = torch.randn(2, 7, 3, 3, requires_grad=True)
    out = q(z)
    rows = z.movedim(1, -1).reshape(-1, 7)
    s, b = brute_entropies(rows.double(), 2.0, 0.2)
    torch.testing.assert_close(out.losses["entropy"].double(), 0.3 * (s - 1.7 * b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["sample_entropy"].double(), s.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["codebook_entropy"].double(), b.detach(), rtol=1e-5, atol=1e-6)
    codes = torch.where(rows > 0, 2.0, -2.0)
    torch.testing.assert_close(out.losses["commitment"], 0.6 * F.mse_loss(rows, codes))
    out.losses["entropy"].backward()  # the entropy term trains the input
    assert z.grad.abs().sum() > 0


def test_projection_when_codebook_dim_differs() -> None:
    torch.manual_seed(6)
    q = LFQ(dim=10, codebook_dim=5, sub_token_bits=[2, 3])
    assert (q.in_channels, q.out_channels, q.codebook_size) == (10, 10, 32)
    z = torch.randn(2, 10, 4, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape
    out.loss.backward()
    assert z.grad.abs().sum() > 0 and q.project_in.weight.grad is not None
    q.eval()
    with torch.no_grad():
        ev = q(z)
        torch.testing.assert_close(q.indices_to_codes(ev.indices), ev.quantized, rtol=0, atol=1e-6)


def test_get_config_round_trip() -> None:
    torch.manual_seed(7)
    q = LFQ(dim=8, codebook_dim=6, entropy_mode="factorized", sub_token_bits=[2, 4], temperature=0.1,
            chunk_size=16, codebook_scale=0.5)
    cfg = q.get_config()
    assert cfg["type"] == "lfq" and cfg["sub_token_bits"] == [2, 4]
    clone = build_quantizer(cfg)
    clone.load_state_dict(q.state_dict())
    assert clone.get_config() == cfg
    z = torch.randn(2, 8, 3, 3)
    a, b = q(z), clone(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert clone.sub_vocab_sizes == (4, 16)


def test_autocast_bf16_runs_in_fp32() -> None:
    torch.manual_seed(8)
    q = LFQ(dim=6, codebook_dim=4)
    z = torch.randn(1, 6, 2, 2)
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        codes = q.indices_to_codes(out.indices)
    assert out.quantized.dtype == torch.float32 and codes.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    z_rounded = q(z.bfloat16().float())
    assert torch.equal(out.indices, z_rounded.indices)
    assert ref.indices.shape == out.indices.shape


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="sub_token_bits"):
        LFQ(dim=18, sub_token_bits=[6, 6])
    with pytest.raises(ConfigError, match="entropy_mode"):
        LFQ(dim=4, entropy_mode="approx")
    with pytest.raises(ConfigError, match="temperature"):
        LFQ(dim=4, temperature=0)
    with pytest.raises(ConfigError, match="codebook_scale"):
        LFQ(dim=4, codebook_scale=0)


# --- oracle: vector-quantize-pytorch -----------------------------------------------------------------
def test_matches_vector_quantize_pytorch_lfq() -> None:
    """Same codes, same ids (both read channel 0 as the most significant bit), same entropies.

    The oracle clamps probabilities at 1e-5 inside its logs, so entropies are compared where every
    probability exceeds that (small inputs, inverse temperature 1).
    """
    vqp = pytest.importorskip("vector_quantize_pytorch", reason="oracle for LFQ semantics (dev extra)")
    torch.manual_seed(9)
    k = 6
    oracle = vqp.LFQ(dim=k, entropy_loss_weight=0.1, diversity_gamma=1.0)
    ours = LFQ(dim=k, temperature=1.0)
    z = torch.randn(2, k, 4, 5) * 0.25
    (quantized, indices, _), breakdown = oracle(z, inv_temperature=1.0, return_loss_breakdown=True)
    out = ours(z)
    assert torch.equal(out.indices, indices.long())
    torch.testing.assert_close(out.quantized, quantized, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.stats["sample_entropy"], breakdown.per_sample_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["codebook_entropy"], breakdown.batch_entropy, rtol=1e-5, atol=1e-6)
    ids = torch.randint(0, 2**k, (2, 3, 3))
    torch.testing.assert_close(ours.indices_to_codes(ids), oracle.indices_to_codes(ids), rtol=0, atol=0)
