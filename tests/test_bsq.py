"""BSQ: codes on the unit sphere, LFQ's ids and entropy on normalised latents, oracle and the contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.errors import ConfigError
from vtok.quantizers.base import build_quantizer
from vtok.quantizers.bsq import BSQ
from vtok.quantizers.lfq import bits_to_ids, ids_to_bits


def brute_entropies(u: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``-||u − c||² / T`` over all ``2^K`` codes ``c ∈ {±1/sqrt(K)}^K``, materialised."""
    k = u.shape[1]
    bits = ids_to_bits(torch.arange(2**k), k)
    s = torch.tensor(1 / math.sqrt(k), dtype=u.dtype)
    codes = torch.where(bits, s, -s)
    probs = (-(u[:, None] - codes[None]).square().sum(-1) / temperature).softmax(dim=1)
    mean = probs.mean(dim=0)
    return -torch.xlogy(probs, probs).sum(1).mean(), -torch.xlogy(mean, mean).sum()


@pytest.mark.parametrize("mode", ["exact", "factorized"])
@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 4), (1, 6, 2, 3, 2)])
def test_contract_1d_2d_3d(shape: tuple[int, ...], mode: str) -> None:
    torch.manual_seed(0)
    q = BSQ(dim=6, entropy_mode=mode, chunk_size=4)
    z = torch.randn(*shape, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (shape[0], *shape[2:]) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 64
    qd = out.quantized.detach()
    torch.testing.assert_close(qd.abs(), torch.full_like(qd, 1 / math.sqrt(6)))
    torch.testing.assert_close(qd.norm(dim=1), torch.ones(shape[0], *shape[2:]))  # on the unit sphere
    assert torch.equal(out.indices, bits_to_ids(z.detach().movedim(1, -1) > 0))  # normalising keeps signs
    assert set(out.losses) == {"commitment", "entropy"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert {"usage", "perplexity", "sample_entropy", "codebook_entropy"} <= set(out.stats)
    torch.testing.assert_close(q.indices_to_codes(out.indices), qd, rtol=0, atol=1e-6)
    (out.quantized * torch.randn_like(z)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        ev = q(z)
    assert torch.equal(q.indices_to_codes(ev.indices), ev.quantized)
    assert set(ev.losses) == {"commitment"}


def test_straight_through_reaches_input_through_the_normalisation() -> None:
    q = BSQ(dim=5, entropy_weight=0.0, commitment_weight=0.0)
    z = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.randn(2, 5, 4)
    (q(z).quantized * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * w).sum().backward()  # straight-through: dq/du = identity
    torch.testing.assert_close(z.grad, z2.grad)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_losses_match_brute_force_on_the_sphere(temperature: float) -> None:
    torch.manual_seed(1)
    q = BSQ(dim=8, entropy_weight=0.2, commitment_weight=0.5, diversity_weight=1.5, temperature=temperature)
    z = torch.randn(3, 8, 5)
    out = q(z)
    u = F.normalize(z.movedim(1, -1).reshape(-1, 8), dim=-1)
    s, b = brute_entropies(u.double(), temperature)
    torch.testing.assert_close(out.stats["sample_entropy"].double(), s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["codebook_entropy"].double(), b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["entropy"].double(), 0.2 * (s - 1.5 * b), rtol=1e-5, atol=1e-6)
    codes = torch.where(u > 0, 1 / math.sqrt(8), -1 / math.sqrt(8))
    torch.testing.assert_close(out.losses["commitment"], 0.5 * F.mse_loss(u, codes))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 8))
def test_factorized_upper_bounds_exact(seed: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, k, 12, generator=gen)
    stats = [BSQ(dim=k, entropy_mode=m, temperature=0.2)(z).stats for m in ("exact", "factorized")]
    assert float(stats[1]["codebook_entropy"]) >= float(stats[0]["codebook_entropy"]) - 1e-5
    torch.testing.assert_close(stats[0]["sample_entropy"], stats[1]["sample_entropy"])


def test_projection_and_sub_tokens() -> None:
    torch.manual_seed(2)
    q = BSQ(dim=10, codebook_dim=6, sub_token_bits=[2, 4])
    assert (q.in_channels, q.out_channels, q.codebook_size, q.sub_vocab_sizes) == (10, 10, 64, (4, 16))
    z = torch.randn(2, 10, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    assert z.grad.abs().sum() > 0
    parts = q.split_indices(out.indices)
    assert torch.equal(parts[..., 0], out.indices >> 4) and torch.equal(q.merge_indices(parts), out.indices)
    q.eval()
    with torch.no_grad():
        ev = q(z)
        torch.testing.assert_close(q.indices_to_codes(ev.indices), ev.quantized, rtol=0, atol=1e-6)
        latent = F.normalize(q.project_in(z.movedim(1, -1)), dim=-1)
        sphere = torch.where(latent > 0, 1 / math.sqrt(6), -1 / math.sqrt(6))
        torch.testing.assert_close(ev.quantized, q.project_out(sphere).movedim(-1, 1))


def test_get_config_round_trip() -> None:
    torch.manual_seed(3)
    q = BSQ(dim=8, codebook_dim=6, temperature=0.5, entropy_mode="factorized", sub_token_bits=[3, 3])
    cfg = q.get_config()
    assert cfg["type"] == "bsq" and cfg["codebook_dim"] == 6 and cfg["temperature"] == 0.5
    clone = build_quantizer(cfg)
    clone.load_state_dict(q.state_dict())
    z = torch.randn(2, 8, 2, 2)
    a, b = q(z), clone(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)


def test_autocast_bf16_runs_in_fp32() -> None:
    torch.manual_seed(4)
    q = BSQ(dim=4)
    z = torch.randn(1, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        codes = q.indices_to_codes(out.indices)
    assert out.quantized.dtype == torch.float32 and codes.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    assert torch.equal(out.indices, q(z.bfloat16().float()).indices)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="sub_token_bits"):
        BSQ(dim=6, sub_token_bits=[3, 4])
    with pytest.raises(ConfigError, match="codebook_dim"):
        BSQ(dim=6, codebook_dim=0)


def test_matches_vector_quantize_pytorch_spherical_lfq() -> None:
    """vector-quantize-pytorch's ``LFQ(spherical=True)`` is BSQ: same codes, ids and entropies.

    Its inverse temperature multiplies ``2 u·c``, i.e. equals our ``1 / temperature``.
    """
    vqp = pytest.importorskip("vector_quantize_pytorch", reason="oracle for BSQ semantics (dev extra)")
    torch.manual_seed(5)
    k = 6
    oracle = vqp.LFQ(dim=k, spherical=True)
    ours = BSQ(dim=k, temperature=1.0)
    z = torch.randn(2, k, 3, 4)
    (quantized, indices, _), breakdown = oracle(z, inv_temperature=1.0, return_loss_breakdown=True)
    out = ours(z)
    assert torch.equal(out.indices, indices.long())
    torch.testing.assert_close(out.quantized, quantized, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.stats["sample_entropy"], breakdown.per_sample_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.stats["codebook_entropy"], breakdown.batch_entropy, rtol=1e-5, atol=1e-6)
    ids = torch.randint(0, 2**k, (2, 3, 3))
    torch.testing.assert_close(ours.indices_to_codes(ids), oracle.indices_to_codes(ids), rtol=0, atol=1e-7)
