"""IBQ: the chunked custom autograd function against a dense reference, and the quantizer contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtok.quantizers.base import build_quantizer
from vtok.quantizers.ibq import IBQ, ibq_quantize


def dense_ibq(z: torch.Tensor, codebook: torch.Tensor, temperature: float, straight_through: bool = True):
    """The textbook dense formulation (N × K matrices), differentiated by autograd."""
    logits = z @ codebook.T / temperature
    probs = logits.softmax(dim=1)
    idx = logits.argmax(dim=1)
    if straight_through:
        hard = F.one_hot(idx, codebook.shape[0]).to(z.dtype)
        q = (hard - probs.detach() + probs) @ codebook
    else:
        q = probs @ codebook
    sample_entropy = -(probs * probs.log()).sum(dim=1).mean()
    mean_probs = probs.mean(dim=0)
    batch_entropy = -(mean_probs * mean_probs.log()).sum()
    return q, idx, sample_entropy, batch_entropy


def _grads(fn, z, codebook, weights):
    z = z.clone().requires_grad_(True)
    codebook = codebook.clone().requires_grad_(True)
    q, idx, h, hb = fn(z, codebook)
    ((q * weights).sum() + 0.3 * h - 0.7 * hb).backward()
    return q.detach(), idx, h.detach(), hb.detach(), z.grad, codebook.grad


@pytest.mark.parametrize("straight_through", [True, False])
@pytest.mark.parametrize("chunk_size", [1000, 256, 333, 7])
def test_chunked_matches_dense_at_k1000(chunk_size: int, straight_through: bool) -> None:
    torch.manual_seed(chunk_size)
    z = torch.randn(300, 16, dtype=torch.float64)
    codebook = torch.randn(1000, 16, dtype=torch.float64)
    weights = torch.randn(300, 16, dtype=torch.float64)
    temperature = 2.0
    got = _grads(lambda a, b: ibq_quantize(a, b, temperature, chunk_size, straight_through, True), z, codebook,
                 weights)
    ref = _grads(lambda a, b: dense_ibq(a, b, temperature, straight_through), z, codebook, weights)
    assert torch.equal(got[1], ref[1])  # argmax
    for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_straight_through_value_is_exactly_the_selected_code() -> None:
    torch.manual_seed(1)
    z, codebook = torch.randn(50, 8), torch.randn(97, 8)
    q, idx, _, _ = ibq_quantize(z, codebook, 1.0, 10)
    assert torch.equal(q, codebook[idx])
    assert torch.equal(idx, (z @ codebook.T).argmax(dim=1))


def test_gradcheck_soft_path_and_entropies() -> None:
    torch.manual_seed(2)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)

    def soft(a: torch.Tensor, b: torch.Tensor):
        q, _, h, hb = ibq_quantize(a, b, 1.5, 3, straight_through=False, entropy=True)
        return q, h, hb

    assert torch.autograd.gradcheck(soft, (z, codebook))

    def entropies_only(a: torch.Tensor, b: torch.Tensor):  # the straight-through mode's smooth outputs
        _, _, h, hb = ibq_quantize(a, b, 0.7, 2, straight_through=True, entropy=True)
        return h, hb

    assert torch.autograd.gradcheck(entropies_only, (z, codebook))


def test_unselected_codes_receive_gradient() -> None:
    """The point of IBQ: plain VQ only moves selected codes; IBQ moves all of them."""
    torch.manual_seed(3)
    q = IBQ(dim=4, codebook_size=64)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    (out.quantized.square().sum() + out.loss).backward()
    used = torch.zeros(64, dtype=torch.bool)
    used[out.indices.flatten()] = True
    assert (~used).any()
    grad_norm = q.codebook.grad.norm(dim=1)
    assert (grad_norm[~used] > 0).all()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 4), (1, 6, 2, 3, 2)])
def test_contract_1d_2d_3d(shape: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    q = IBQ(dim=6, codebook_size=32, chunk_size=5, entropy_weight=0.1)
    z = torch.randn(*shape, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (shape[0], *shape[2:]) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 32
    assert set(out.losses) == {"commitment", "codebook", "entropy"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert {"usage", "perplexity"} <= set(out.stats)
    out.loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        ev = q(z)
    torch.testing.assert_close(q.indices_to_codes(ev.indices), ev.quantized, rtol=0, atol=1e-6)
    torch.testing.assert_close(ev.quantized, out.quantized.detach(), rtol=0, atol=1e-6)


def test_losses_match_their_definition() -> None:
    torch.manual_seed(5)
    q = IBQ(dim=4, codebook_size=16, beta=0.5)
    with torch.no_grad():
        q.codebook.normal_()
    z = torch.randn(3, 4, 5)
    out = q(z)
    rows = z.movedim(1, -1).reshape(-1, 4)
    sel = q.codebook[out.indices.reshape(-1)]
    mse = F.mse_loss(rows, sel)
    torch.testing.assert_close(out.losses["commitment"], 0.5 * mse)
    torch.testing.assert_close(out.losses["codebook"], 2 * mse)


def test_entropy_loss_value_and_sign() -> None:
    torch.manual_seed(6)
    q = IBQ(dim=4, codebook_size=16, entropy_weight=2.0, temperature=0.5, chunk_size=3)
    z = torch.randn(40, 4)[..., None]  # 1D layout, n = 1
    out = q(z)
    _, _, h, hb = dense_ibq(z[..., 0], q.codebook.detach(), 0.5)
    torch.testing.assert_close(out.losses["entropy"], 2.0 * (h - hb))


def test_no_grad_path_matches_autograd_path() -> None:
    torch.manual_seed(7)
    q = IBQ(dim=5, codebook_size=50, chunk_size=8)
    z = torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        a = q(z)
    b = q(z.requires_grad_(True))
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.quantized, b.quantized.detach(), rtol=0, atol=0)


def test_autocast_runs_in_fp32() -> None:
    q = IBQ(dim=4, codebook_size=16)
    z = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, q(z).indices)


def test_config_round_trip() -> None:
    q = IBQ(dim=4, codebook_size=16, beta=0.3, temperature=0.5, entropy_weight=0.1, chunk_size=7)
    cfg = q.get_config()
    assert cfg == {"type": "ibq", "dim": 4, "codebook_size": 16, "beta": 0.3, "temperature": 0.5,
                   "entropy_weight": 0.1, "chunk_size": 7}
    r = build_quantizer(cfg)
    assert isinstance(r, IBQ) and r.get_config() == cfg
    r.load_state_dict(q.state_dict())
    z = torch.randn(1, 4, 2, 2)
    assert torch.equal(r(z).indices, q(z).indices)
