"""Pixel reconstruction losses between a reconstruction and its target image.

Both are plain means over every element, computed in float32 (so a bf16 decoder output under autocast is
compared at full precision). Shapes must match exactly: silent broadcasting of, say, ``(B, 3, H, W)``
against ``(3, H, W)`` would give a loss of the wrong meaning without any error.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["l1_loss", "l2_loss"]


def _check(reconstruction: Tensor, target: Tensor, name: str) -> None:
    if reconstruction.shape != target.shape:
        raise ValueError(f"{name}: reconstruction {tuple(reconstruction.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")


def l1_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error ``mean(|x̂ - x|)`` (the VQGAN pixel term, Esser et al. 2021); a scalar."""
    _check(reconstruction, target, "l1_loss")
    return (reconstruction.float() - target.float()).abs().mean()


def l2_loss(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error ``mean((x̂ - x)²)`` (the VQ-VAE pixel term, van den Oord et al. 2017); a scalar."""
    _check(reconstruction, target, "l2_loss")
    return (reconstruction.float() - target.float()).square().mean()
