"""VectorQuantizer: the quantizer contract for every option, plus toy problems for EMA, k-means, restarts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.errors import ConfigError
from vtok.quantizers.base import build_quantizer
from vtok.quantizers.vq import VectorQuantizer, kmeans, rotate_to_code

VARIANTS: dict[str, dict[str, Any]] = {
    "euclidean": {},
    "cosine": {"distance": "cosine"},
    "projected": {"codebook_dim": 8, "distance": "cosine"},
    "projected-euclidean": {"codebook_dim": 8},
    "ema": {"learning": "ema"},
    "rotation": {"rotation_trick": True},
    "restart": {"dead_code_steps": 2, "learning": "ema"},
}


def make(dim: int = 16, codebook_size: int = 64, seed: int = 0, **kw: Any) -> VectorQuantizer:
    torch.manual_seed(seed)
    q = VectorQuantizer(dim, codebook_size, chunk_size=10, **kw)
    with torch.no_grad():  # spread the codes out so lookups are not all ties near zero
        q.codebook.copy_(torch.randn_like(q.codebook))
        if q.learning == "ema":
            q.ema_sum.copy_(q.codebook)
    return q


def clusters(n_per: int, centres: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pts = centres.repeat_interleave(n_per, dim=0)
    return pts + noise * torch.randn(pts.shape, generator=g)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_contract(name: str) -> None:
    q = make(**VARIANTS[name]).train()
    z = torch.randn(2, 16, 5, 6, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices is not None and out.indices.shape == (2, 5, 6) and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 64
    assert set(out.losses) == ({"commitment"} if q.learning == "ema" else {"commitment", "codebook"})
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values())
    assert {"usage", "perplexity"} <= set(out.stats)
    assert 0 < float(out.stats["usage"]) <= 1 and float(out.stats["perplexity"]) >= 1
    (out.quantized.square().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    if q.learning == "gradient":
        assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0
        assert not q.codebook.grad[torch.bincount(out.indices.flatten(), minlength=64) == 0].any()
    else:
        assert "codebook" not in dict(q.named_parameters())
        assert q.codebook.grad is None
    if q.in_proj is not None:
        assert q.in_proj.weight.grad is not None and q.out_proj is not None and q.out_proj.weight.grad is not None

    q.eval()
    out = q(z)
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_values_are_the_codes(name: str) -> None:
    """Quantized = (projected, normalised) code of the nearest entry, exactly, in train and eval mode."""
    q = make(**VARIANTS[name])
    z = torch.randn(3, 16, 4, requires_grad=True)
    updates_in_forward = q.learning == "ema" or q.dead_code_steps > 0  # codebook changes after the lookup
    for train in ([] if updates_in_forward else [True]) + [False]:
        q.train(train)
        out = q(z)
        assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    z_e = q._to_code_space(z.detach().movedim(1, -1).reshape(-1, 16))
    if q.distance == "cosine":
        assert torch.allclose(z_e.norm(dim=1), torch.ones(12))
    codes = F.normalize(q.codebook, dim=1) if q.distance == "cosine" else q.codebook
    ref = torch.cdist(z_e, codes).argmin(dim=1)
    assert torch.equal(out.indices.flatten(), ref)


def test_losses_are_weighted_mse() -> None:
    q = make(beta=0.5, codebook_weight=2.0)
    z = torch.randn(2, 16, 3, 3)
    out = q(z)
    codes = q.indices_to_codes(out.indices)
    mse = F.mse_loss(z, codes)
    torch.testing.assert_close(out.losses["commitment"], 0.5 * mse)
    torch.testing.assert_close(out.losses["codebook"], 2.0 * mse)


def test_rotation_trick_matches_explicit_matrix() -> None:
    torch.manual_seed(0)
    e = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(5, 4, dtype=torch.float64)
    g = torch.randn(5, 4, dtype=torch.float64)
    out = rotate_to_code(e, q)
    assert torch.equal(out, q)
    out.backward(g)
    for i in range(5):
        u, v = F.normalize(e[i].detach(), dim=0), F.normalize(q[i], dim=0)
        w = F.normalize(u + v, dim=0)
        rot = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        torch.testing.assert_close(rot @ u, v)  # R maps the direction of e onto that of q
        torch.testing.assert_close(rot.T @ rot, torch.eye(4, dtype=torch.float64))  # and is orthogonal
        scale = q[i].norm() / e[i].norm()
        torch.testing.assert_close(e.grad[i], scale * rot.T @ g[i])


def test_rotation_trick_changes_gradients_not_values() -> None:
    plain, rotated = make(), make(rotation_trick=True)
    rotated.load_state_dict(plain.state_dict())
    z = torch.randn(2, 16, 4, 4)
    grads, values = [], []
    for q in (plain, rotated):
        zz = z.clone().requires_grad_(True)
        out = q(zz)
        (out.quantized * torch.linspace(-1, 1, 16)[None, :, None, None]).sum().backward()
        grads.append(zz.grad)
        values.append(out.quantized.detach())
    assert torch.equal(values[0], values[1])
    assert grads[1].abs().sum() > 0
    assert (grads[0] - grads[1]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(2, 16, 7), (1, 16, 2, 3, 4), (3, 16)])
def test_any_number_of_spatial_dims(shape: tuple[int, ...]) -> None:
    q = make(codebook_dim=8).eval()
    z = torch.randn(shape)
    out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices is not None and out.indices.shape == (shape[0], *shape[2:])
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_round_trip(name: str) -> None:
    q = make(**VARIANTS[name]).train()
    q(torch.randn(2, 16, 4, 4))  # move EMA / restart state away from its initial values
    cfg = q.get_config()
    assert cfg["type"] == "vq"
    q2 = build_quantizer(cfg)
    q2.load_state_dict(q.state_dict())
    q.eval()
    q2.eval()
    z = torch.randn(2, 16, 3, 5)
    a, b = q(z), q2(z)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.indices, b.indices)
    assert a.stats.keys() == b.stats.keys()


def test_autocast_bfloat16() -> None:
    q = make(codebook_dim=8, distance="cosine").train()
    for z in (torch.randn(1, 16, 2, 2), torch.randn(1, 16, 2, 2).bfloat16()):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = q(z)
        assert out.quantized.dtype == torch.float32 and torch.isfinite(out.quantized).all()
        assert all(torch.isfinite(v) for v in out.losses.values())
        torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, rtol=0, atol=1e-6)


def test_ema_moves_codes_to_the_data() -> None:
    centres = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]])
    data = clusters(64, centres, 0.3, seed=0).T[None]  # (1, 2, 256)
    q = make(dim=2, codebook_size=8, learning="ema", ema_decay=0.8).train()
    with torch.no_grad():
        q.codebook.add_(30.0)  # every code far from the data
        q.ema_sum.copy_(q.codebook)
    frozen = VectorQuantizer(2, 8, learning="ema").eval()
    frozen.load_state_dict(q.state_dict())

    def error(m: VectorQuantizer) -> float:
        m.eval()
        return float(F.mse_loss(m(data).quantized, data))

    before = error(frozen)
    for _ in range(30):
        q.train()
        q(data)
    after = error(q)
    assert before > 500 and after < before / 20
    assert error(frozen) == before  # eval-mode calls never update


def test_ema_code_is_mean_of_its_rows() -> None:
    """With decay 0 one EMA step sets each used code to the mean of its rows (Laplace smoothing aside)."""
    q = make(dim=4, codebook_size=8, learning="ema", ema_decay=0.0, ema_eps=1e-9).train()
    rows = torch.randn(100, 4)
    out = q(rows.T[None])
    idx = out.indices.flatten()
    for k in idx.unique():
        torch.testing.assert_close(q.codebook[k], rows[idx == k].mean(dim=0), rtol=1e-5, atol=1e-5)


def test_kmeans_init_finds_cluster_centres() -> None:
    centres = torch.tensor([[5.0, 0.0, 0.0], [-5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, -5.0]])
    data = clusters(100, centres, 0.1, seed=1).T[None]  # (1, 3, 400)
    q = make(dim=3, codebook_size=16, kmeans_init=True, kmeans_iters=30)
    assert not bool(q.initialized)
    q.eval()
    q(data)
    assert not bool(q.initialized)  # only training runs initialise
    q.train()
    q(data)
    assert bool(q.initialized)
    nearest = torch.cdist(centres, q.codebook.detach()).min(dim=1).values
    assert nearest.max() < 0.3, nearest  # every cluster got a code
    q.eval()
    out = q(data)
    assert float(F.mse_loss(out.quantized, data)) < 0.01  # below the within-cluster variance (0.1²)
    rows, idx = data[0].T, out.indices.flatten()
    for k in idx.unique():  # Lloyd's fixed point: each used code is the mean of the rows it wins
        torch.testing.assert_close(q.codebook[k].detach(), rows[idx == k].mean(dim=0), rtol=1e-5, atol=1e-5)
    q.train()
    # Once only: a later batch leaves the (gradient-learned, no optimiser step) codebook alone.
    before = q.codebook.detach().clone()
    q(torch.randn(1, 3, 50))
    assert torch.equal(q.codebook.detach(), before)
    # The flag is saved, so a reloaded model does not re-initialise.
    q2 = build_quantizer(q.get_config()).train()
    q2.load_state_dict(q.state_dict())
    q2(torch.randn(1, 3, 50))
    assert torch.equal(q2.codebook.detach(), before)


def test_kmeans_cosine_gives_unit_centres() -> None:
    torch.manual_seed(0)
    centres = kmeans(F.normalize(torch.randn(200, 5), dim=1), 7, iters=5, distance="cosine", chunk_size=3)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(7))


@pytest.mark.parametrize("learning", ["gradient", "ema"])
def test_dead_code_restart_revives_codes(learning: str) -> None:
    centres = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [4.0, -4.0], [-4.0, -4.0]])

    def run(dead_code_steps: int) -> tuple[float, VectorQuantizer, list[float]]:
        q = make(dim=2, codebook_size=32, learning=learning, dead_code_steps=dead_code_steps)
        with torch.no_grad():
            q.codebook.mul_(0.1).add_(20.0)
            if learning == "ema":
                q.ema_sum.copy_(q.codebook)
        restarted = []
        for step in range(12):
            q.train()
            z = clusters(32, centres, 1.0, seed=step).T[None]
            out = q(z)
            restarted.append(float(out.stats.get("restarted", torch.zeros(()))))
        q.eval()
        test = clusters(200, centres, 1.0, seed=99).T[None]
        return float(q(test).stats["usage"]), q, restarted

    baseline, _, _ = run(0)
    usage, q, restarted = run(2)
    assert baseline <= 2 / 32
    assert usage >= 0.5 and usage > 5 * baseline
    assert sum(restarted) > 0 and restarted[0] == 0  # nothing can be dead before 2 steps have passed
    assert (q.unused_steps < 2).all()  # every dead code was replaced


def test_restart_works_with_backward_after_update() -> None:
    """The in-place restart of a gradient-learned codebook must not break the step's backward pass."""
    q = make(dim=4, codebook_size=32, dead_code_steps=1).train()
    z = torch.randn(1, 4, 3, requires_grad=True)
    out = q(z)
    assert float(out.stats["restarted"]) > 0
    (out.quantized.sum() + out.loss).backward()
    assert z.grad is not None and q.codebook.grad is not None


def test_dead_stat_in_eval() -> None:
    q = make(dim=4, codebook_size=8, dead_code_steps=3).eval()
    with torch.no_grad():
        q.unused_steps.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 0, 0]))
    out = q(torch.randn(1, 4, 5))
    assert float(out.stats["dead"]) == 3 and float(out.stats["restarted"]) == 0
    assert q.unused_steps.tolist() == [0, 1, 2, 3, 4, 5, 0, 0]


def test_bad_options_raise_config_errors() -> None:
    for kw in ({"distance": "dot"}, {"learning": "adam"}, {"ema_decay": 1.0}, {"chunk_size": 0},
               {"codebook_dim": 0}, {"dead_code_steps": -1}):
        with pytest.raises(ConfigError, match="vq"):
            VectorQuantizer(4, 8, **kw)


def test_matches_vector_quantize_pytorch_indices() -> None:
    vqp = pytest.importorskip("vector_quantize_pytorch", reason="oracle only: vector-quantize-pytorch not installed")
    torch.manual_seed(0)
    ours = make(dim=8, codebook_size=50).eval()
    theirs = vqp.VectorQuantize(dim=8, codebook_size=50).eval()
    with torch.no_grad():
        theirs._codebook.embed.copy_(ours.codebook.detach()[None])
    z = torch.randn(2, 8, 30)
    _, their_idx, _ = theirs(z.transpose(1, 2))
    assert torch.equal(ours(z).indices, their_idx)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 40), d=st.integers(1, 5), n=st.integers(1, 20), seed=st.integers(0, 2**16),
       distance=st.sampled_from(["euclidean", "cosine"]))
def test_chosen_code_is_at_minimal_distance(k: int, d: int, n: int, seed: int, distance: str) -> None:
    torch.manual_seed(seed)
    q = VectorQuantizer(d, k, distance=distance, chunk_size=7).eval()
    with torch.no_grad():
        q.codebook.normal_()
    z = torch.randn(1, d, n)
    out = q(z)
    rows = z[0].T
    codes = q.codebook.detach()
    if distance == "cosine":
        rows, codes = F.normalize(rows, dim=1), F.normalize(codes, dim=1)
    dists = torch.cdist(rows, codes)
    chosen = dists.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
    assert (chosen <= dists.min(dim=1).values + 1e-5).all()
