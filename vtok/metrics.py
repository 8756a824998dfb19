"""Image-quality metrics with an explicit protocol: inputs in [0, 1], data range 1.

- :func:`psnr`: per image, on outputs quantised to 8 bits (what a saved PNG holds), then averaged by
  the caller; identical images give ``inf``.
- :func:`ssim`: Gaussian window 11, σ = 1.5, K1 = 0.01, K2 = 0.03, computed per channel over the positions
  whose window lies inside the image, averaged over channels and positions — the same numbers as
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=0)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def quantize_8bit(images: Tensor) -> Tensor:
    """Round [0, 1] images to the 256 levels an 8-bit file stores."""
    return images.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB, ``(B,)``, after 8-bit quantisation of both inputs (data range 1)."""
    a, b = quantize_8bit(images.float()), quantize_8bit(reference.float())
    mse = (a - b).square().flatten(1).mean(dim=1)
    return torch.where(mse > 0, -10.0 * torch.log10(mse), torch.full_like(mse, math.inf))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(images: Tensor, reference: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM, ``(B,)``, for float ``(B, C, H, W)`` inputs in [0, 1] (both sides ≥ ``window``)."""
    if images.shape != reference.shape or images.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(images.shape)} "
                         f"and {tuple(reference.shape)}")
    if min(images.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window}, got {tuple(images.shape[-2:])}")
    x, y = images.double(), reference.double()
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x.device).double()
    kh = g.view(1, 1, window, 1).expand(c, 1, window, 1)
    kw = g.view(1, 1, 1, window).expand(c, 1, 1, window)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1).float()
