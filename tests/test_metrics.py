"""PSNR and SSIM follow their documented protocol (8-bit PSNR, Gaussian SSIM equal to scikit-image's)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vtok.metrics import psnr, quantize_8bit, ssim


def test_psnr_hand_computed_and_identity() -> None:
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[0, 0, 0, 0] = 1.0  # one of 48 values off by the full range
    assert psnr(b, a).item() == pytest.approx(10 * math.log10(48))
    assert psnr(a, a).item() == math.inf
    assert psnr(a + 0.001, a).item() == math.inf  # equal once stored as 8-bit


def test_ssim_identity_and_monotonic_in_noise() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    scores = [ssim((x + s * torch.randn_like(x)).clamp(0, 1), x).mean().item() for s in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_ssim_and_psnr_match_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the reference (dev dependency)")
    torch.manual_seed(1)
    x = torch.rand(2, 3, 40, 33)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    for i in range(2):
        a, b = x[i].double().numpy(), y[i].double().numpy()
        ref = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            data_range=1.0, channel_axis=0)
        assert ssim(x[i : i + 1], y[i : i + 1]).item() == pytest.approx(ref, abs=1e-5)
        q = [quantize_8bit(t[i]).double().numpy() for t in (x, y)]
        ref_psnr = metrics.peak_signal_noise_ratio(q[0], q[1], data_range=1.0)
        assert psnr(y[i : i + 1], x[i : i + 1]).item() == pytest.approx(ref_psnr, abs=1e-4)
    assert np.isfinite(ref)
