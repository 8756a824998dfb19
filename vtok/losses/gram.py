"""Gram-matrix loss on perceptual features: match feature *correlations* rather than feature values.

The Gram matrix of a feature map ``F`` (``C`` channels at ``N`` positions) is ``G = F Fᵀ / (C · N)``: the
channel-by-channel correlation of the features averaged over positions, which keeps which textures occur
and drops where they occur. Gatys et al. (2016, "Image Style Transfer Using Convolutional Neural
Networks") used it as a style loss; AToken (Lu et al. 2025, "AToken: A Unified Tokenizer for Vision") trains
its tokenizer with a Gram loss on perceptual features in place of a GAN, keeping the high-frequency detail
an adversary would bring without the instability of adversarial training.

Normalisation, stated because it sets the scale of the loss weight. Per image and per feature stage
``G = F Fᵀ / (C · N)`` (the ``1 / N`` makes it an average over positions, whatever the image size). Per
stage, the mean squared difference ``mean((G(x̂) - G(x))²)`` over the batch and the ``C × C`` entries is
divided by ``mean(G(x)²)``, the target's own mean square (a constant: no gradient flows through it), and the
loss is the mean of these relative errors over the stages. Without that division the stages are not
comparable: measured on natural 64×64 images against a 3×3 box blur, the raw squared errors of the five
ST-LPIPS VGG stages span eight orders of magnitude (2e-9 to 0.16: the last stage alone decides the loss) and
AlexNet's are all below 1e-6. With it every stage counts on the same footing and the loss reads as a
fraction: 0 for identical feature statistics, about 1 for a flat image of the right mean colour, and
about 0.6 (VGG) or 0.3 (AlexNet) for the box-blurred images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vtok.losses.perceptual import STLPIPS

__all__ = ["FeatureFn", "GramLoss", "gram_matrix", "stlpips_features"]

FeatureFn = Callable[[Tensor], Sequence[Tensor]]
_TINY = torch.finfo(torch.float32).tiny  # guards the division only for an all-zero target stage


def gram_matrix(features: Tensor) -> Tensor:
    """Per-image Gram matrices ``(B, C, C)`` of features ``(B, C, *spatial)``: ``F Fᵀ / (C · N)``, ``N`` the
    number of positions. Computed in float32 with autocast off (the products of many bf16 activations would
    lose most of their digits)."""
    if features.dim() < 3:
        raise ValueError(f"gram_matrix: expected features (B, C, *spatial), got shape {tuple(features.shape)}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = features.float().flatten(2)
        c, n = f.shape[1], f.shape[2]
        return torch.bmm(f, f.transpose(1, 2)) / (c * n)


def stlpips_features(model: STLPIPS) -> FeatureFn:
    """The five ST-LPIPS backbone feature maps of images in [0, 1] (grayscale ``C = 1`` replicated to RGB).

    ``STLPIPS.features`` itself expects images already converted to the network's input range; this wraps
    the conversion (:meth:`STLPIPS.to_network_input`) so callers keep vtok's [0, 1] convention.
    """

    def features(images: Tensor) -> list[Tensor]:
        if images.dim() == 4 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return model.features(model.to_network_input(images.to(model.shift.dtype)))

    return features


def _owner(features_fn: object) -> nn.Module | None:
    """The module whose parameters ``features_fn`` uses, when that can be seen (a module or its bound method)."""
    if isinstance(features_fn, nn.Module):
        return features_fn
    owner = getattr(features_fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


class GramLoss(nn.Module):
    """Gram-matrix loss between a reconstruction and its target (see the module docstring); a scalar.

    ``features_fn``: any callable mapping images ``(B, C, H, W)`` in [0, 1] to a list of feature maps
    ``(B, C_l, H_l, W_l)``, or an :class:`~vtok.losses.perceptual.STLPIPS` module, whose backbone is then used
    through :func:`stlpips_features` (the trainer's choice: ``GramLoss(stlpips)``). The bound method
    ``stlpips.features`` is refused, because it expects network-range input, not [0, 1] images.

    The feature network is a fixed judge: gradients reach the reconstruction only. A module (or a module's
    bound method) with trainable parameters is therefore refused — freeze it with ``requires_grad_(False)``;
    a plain function is trusted to use frozen weights. Target features are computed under ``no_grad``.
    """

    def __init__(self, features_fn: FeatureFn | STLPIPS) -> None:
        super().__init__()
        if getattr(features_fn, "__func__", None) is STLPIPS.features:
            raise ValueError("GramLoss: pass the STLPIPS module itself (GramLoss(stlpips)), not stlpips.features, "
                             "which expects network-range input rather than images in [0, 1]")
        owner = _owner(features_fn)
        if owner is not None and any(p.requires_grad for p in owner.parameters()):
            raise ValueError(f"GramLoss: the feature network {type(owner).__name__} has trainable parameters; "
                             "freeze it with requires_grad_(False) so the Gram loss cannot train it")
        self.stlpips = features_fn if isinstance(features_fn, STLPIPS) else None
        self._features_fn = stlpips_features(features_fn) if isinstance(features_fn, STLPIPS) else features_fn

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Mean over feature stages of ``mean((G(x̂) - G(x))²) / mean(G(x)²)``, per-image Gram matrices ``G``."""
        if reconstruction.shape != target.shape:
            raise ValueError(f"GramLoss: reconstruction {tuple(reconstruction.shape)} and target "
                             f"{tuple(target.shape)} must have the same shape")
        with torch.no_grad():
            target_grams = [gram_matrix(f) for f in self._features_fn(target)]
        fake_feats = self._features_fn(reconstruction)
        if len(fake_feats) != len(target_grams) or not fake_feats:
            raise ValueError("GramLoss: the feature function must return the same non-empty list of stages "
                             f"for both inputs, got {len(fake_feats)} and {len(target_grams)}")
        per_stage = [
            (gram_matrix(f) - g).square().mean() / g.square().mean().clamp_min(_TINY)
            for f, g in zip(fake_feats, target_grams, strict=True)
        ]
        return torch.stack(per_stage).mean()
