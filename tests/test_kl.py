"""The diagonal-Gaussian (KL) bottleneck: sampling vs mode, closed-form KL, contract."""

from __future__ import annotations

import pytest
import torch

from vtok.errors import ConfigError
from vtok.quantizers.base import build_quantizer
from vtok.quantizers.kl import DiagonalGaussian


def test_eval_is_deterministic_mean_and_train_samples() -> None:
    q = DiagonalGaussian(latent_channels=3)
    z = torch.randn(2, 6, 4, 4)
    q.eval()
    a, b = q(z), q(z)
    assert torch.equal(a.quantized, z[:, :3]) and torch.equal(a.quantized, b.quantized)
    assert a.indices is None
    q.train()
    c, d = q(z), q(z)
    assert not torch.equal(c.quantized, d.quantized)
    assert not torch.equal(c.quantized, z[:, :3])


def test_sample_false_returns_mean_in_training() -> None:
    q = DiagonalGaussian(latent_channels=2, sample=False).train()
    z = torch.randn(2, 4, 3)
    assert torch.equal(q(z).quantized, z[:, :2])


def test_sample_is_reparameterised_with_generator() -> None:
    q = DiagonalGaussian(latent_channels=2)
    z = torch.randn(3, 4, 5, requires_grad=True)
    s1 = q.sample(z, generator=torch.Generator().manual_seed(0))
    s2 = q.sample(z, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)
    mean, logvar = z.detach()[:, :2], z.detach()[:, 2:]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s1.detach(), mean + torch.exp(0.5 * logvar) * noise)
    s1.sum().backward()
    assert z.grad[:, :2].abs().min() > 0 and z.grad[:, 2:].abs().sum() > 0


def test_kl_matches_closed_form_and_reduction() -> None:
    torch.manual_seed(0)
    q = DiagonalGaussian(latent_channels=3, kl_weight=0.5)
    z = torch.randn(4, 6, 2, 5)
    mean, logvar = z[:, :3], z[:, 3:]
    var = logvar.exp()
    # KL(N(m, v) || N(0, 1)) = 0.5 (m^2 + v - 1 - log v), via torch.distributions as an independent oracle
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(0.0, 1.0)
    )
    per_item = ref.flatten(1).sum(dim=1)
    torch.testing.assert_close(q.kl(z), per_item, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(z).losses["kl"], 0.5 * per_item.mean(), rtol=1e-5, atol=1e-5)


def test_kl_zero_for_standard_normal() -> None:
    q = DiagonalGaussian(latent_channels=2)
    z = torch.zeros(3, 4, 7)
    assert torch.equal(q.kl(z), torch.zeros(3))
    assert float(q(z).losses["kl"]) == 0.0


def test_logvar_clamped() -> None:
    q = DiagonalGaussian(latent_channels=1, logvar_clamp=[-2.0, 1.0]).eval()
    z = torch.tensor([[[0.0], [100.0]]])
    out = q(z)
    assert torch.isfinite(out.losses["kl"])
    torch.testing.assert_close(out.stats["std"], torch.exp(torch.tensor(0.5)))


@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 4)])
def test_layouts_gradients_stats(spatial: tuple[int, ...]) -> None:
    q = DiagonalGaussian(latent_channels=2, kl_weight=1.0).train()
    z = torch.randn(2, 4, *spatial, requires_grad=True)
    out = q(z)
    assert out.quantized.shape == (2, 2, *spatial)
    assert set(out.stats) == {"std", "abs_mean"} and not out.stats["std"].requires_grad
    (out.quantized.sum() + out.loss).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert q.in_channels == 4 and q.out_channels == 2 and q.continuous
    assert q.bits_per_token == 0.0 and q.sub_vocab_sizes == ()


def test_autocast_fp32() -> None:
    q = DiagonalGaussian(latent_channels=2).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(torch.randn(1, 4, 2, 2))
    assert out.quantized.dtype == torch.float32 and out.losses["kl"].dtype == torch.float32


def test_no_indices() -> None:
    q = DiagonalGaussian(latent_channels=2)
    with pytest.raises(NotImplementedError):
        q.indices_to_codes(torch.zeros(1, 2, 2, dtype=torch.long))


def test_bad_config() -> None:
    with pytest.raises(ConfigError):
        DiagonalGaussian(latent_channels=0)
    with pytest.raises(ConfigError):
        DiagonalGaussian(latent_channels=2, logvar_clamp=[3.0, 1.0])


def test_config_round_trip() -> None:
    q = DiagonalGaussian(latent_channels=4, kl_weight=1e-4, logvar_clamp=(-10.0, 5.0), sample=False)
    cfg = q.get_config()
    assert cfg == {"type": "kl", "latent_channels": 4, "kl_weight": 1e-4, "logvar_clamp": [-10.0, 5.0],
                   "sample": False}
    r = build_quantizer(cfg)
    assert isinstance(r, DiagonalGaussian) and r.get_config() == cfg
    z = torch.randn(1, 8, 3)
    torch.testing.assert_close(r.train()(z).quantized, q.train()(z).quantized)
