"""Adversarial training pieces for tokenizers: a PatchGAN discriminator, its losses, LeCAM regularisation and
the VQGAN adaptive generator weight.

How the trainer keeps the two players apart (tested in ``tests/test_losses.py``):

* generator step: ``disc.requires_grad_(False)``, then ``g_loss(disc(reconstruction))`` — gradients flow
  *through* the frozen discriminator into the reconstruction (and :func:`adaptive_weight` can differentiate
  through it) but no discriminator parameter receives a gradient; ``disc.requires_grad_(True)`` afterwards;
* discriminator step: ``disc(torch.cat([real, reconstruction.detach()]))`` — the detached fake keeps the
  discriminator loss out of the tokenizer's graph.

The warm-up ramp of the generator-side weight lives in :mod:`vtok.losses.schedules` (:func:`gan_ramp`,
re-exported here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtok.dist import all_reduce_sum_, world_size
from vtok.losses.schedules import gan_ramp

__all__ = ["GAN_LOSSES", "LeCAM", "PatchDiscriminator", "adaptive_weight", "d_loss", "g_loss", "gan_ramp"]

GAN_LOSSES = ("hinge", "non_saturating")
_MAX_GROUPS = 32


def _groups(channels: int) -> int:
    """The largest group count <= 32 that divides ``channels`` (32 for the usual widths 64..512)."""
    return max(g for g in range(1, min(_MAX_GROUPS, channels) + 1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, "pix2pix"), in the layout VQGAN uses (Esser et al. 2021).

    ``layers`` 4×4 convolutions of stride 2 (widths ``channels · min(2^i, 8)``), one more 4×4 convolution of
    stride 1, and a 4×4 convolution to a single channel: a map of logits, one per overlapping patch (a
    70×70 receptive field for ``layers = 3``), rather than one logit per image. LeakyReLU(0.2) after every
    convolution but the last; a normalisation after every convolution but the first and the last.

    The normalisation is GroupNorm, not the BatchNorm of the original: BatchNorm statistics depend on the
    batch size and, under DDP, on each rank's share of the batch (unless synchronised), and when real and
    fake images share one forward pass BatchNorm lets each image's logit depend on the others'. GroupNorm
    normalises each image on its own, so the logits are the same whatever the batch or the world size.

    Input: images ``(B, C, H, W)`` in [0, 1] (converted to [-1, 1] here, in this one place) with
    ``H, W >= min_size = 3 · 2^layers``. Output: logits ``(B, 1, h, w)``. Weights are drawn from N(0, 0.02)
    (normalisation scales from N(1, 0.02), biases 0), the DCGAN initialisation (Radford et al. 2016).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or channels < 1 or layers < 1:
            raise ValueError(f"PatchDiscriminator: in_channels, channels and layers must be >= 1, "
                             f"got {in_channels}, {channels}, {layers}")
        self.in_channels, self.layers = in_channels, layers
        self.min_size = 3 * 2**layers
        widths = [channels * min(2**i, 8) for i in range(layers + 1)]
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(_groups(widths[i]), widths[i]),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw every weight with the N(0, 0.02) initialisation described in the class docstring."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits ``(B, 1, h, w)`` for images ``(B, C, H, W)`` in [0, 1]."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"PatchDiscriminator: expected images (B, {self.in_channels}, H, W), "
                             f"got shape {tuple(images.shape)}")
        if min(images.shape[-2:]) < self.min_size:
            raise ValueError(f"PatchDiscriminator with {self.layers} layers needs images of at least "
                             f"{self.min_size}x{self.min_size} pixels, got {images.shape[-2]}x{images.shape[-1]}")
        return self.net(images * 2.0 - 1.0)


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"GAN loss must be one of {list(GAN_LOSSES)}, got {kind!r}")


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Discriminator loss, the average of its real-side and fake-side terms (as in VQGAN); a scalar.

    ``"hinge"`` (Lim & Ye 2017; Miyato et al. 2018): ``½ [mean(relu(1 - D(x))) + mean(relu(1 + D(x̂)))]``.
    ``"non_saturating"`` (Goodfellow et al. 2014), the logistic loss on logits:
    ``½ [mean(softplus(-D(x))) + mean(softplus(D(x̂)))]``. Computed in float32.
    """
    _check_kind(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def g_loss(fake_logits: Tensor, kind: str = "hinge") -> Tensor:
    """Generator loss on the discriminator's logits for reconstructions; a scalar.

    ``"hinge"``: ``-mean(D(x̂))`` (the usual generator side of the hinge GAN, used by VQGAN).
    ``"non_saturating"``: ``mean(softplus(-D(x̂))) = -mean(log σ(D(x̂)))`` (Goodfellow et al. 2014), whose
    gradient stays large while the discriminator confidently rejects the fakes. Computed in float32.
    """
    _check_kind(kind)
    fake = fake_logits.float()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


class LeCAM(nn.Module):
    """LeCAM regulariser for the discriminator (Tseng et al. 2021, "Regularizing Generative Adversarial
    Networks under Limited Data").

    Keeps exponential moving averages (EMA) of the mean real logit and the mean fake logit as buffers
    (``ema_real``, ``ema_fake``, starting at 0, saved in ``state_dict``) and penalises real logits above the
    fake anchor and fake logits below the real anchor:

        R = mean(relu(D(x) - ema_fake)²) + mean(relu(ema_real - D(x̂))²)

    which stops the discriminator from driving the two sets of logits ever further apart, its main failure
    when data is scarce. In training mode each call first moves the anchors,
    ``ema ← decay · ema + (1 - decay) · batch mean``, then evaluates R against the updated, detached anchors;
    in eval mode the anchors stay put. Under ``torch.distributed`` the batch means are averaged over all
    ranks before the update, so every rank holds the same anchors (every rank must then call it in step).
    """

    ema_real: Tensor
    ema_fake: Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCAM: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        """Move both anchors towards this batch's mean logits (averaged over ranks when distributed)."""
        means = torch.stack([real_logits.detach().float().mean(), fake_logits.detach().float().mean()])
        means = all_reduce_sum_(means) / world_size()
        self.ema_real.mul_(self.decay).add_((1.0 - self.decay) * means[0])
        self.ema_fake.mul_(self.decay).add_((1.0 - self.decay) * means[1])

    def regularizer(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """The LeCAM penalty R for these logits (updating the anchors first in training mode); a scalar."""
        if self.training:
            self.update(real_logits, fake_logits)
        real, fake = real_logits.float(), fake_logits.float()
        return F.relu(real - self.ema_fake).square().mean() + F.relu(self.ema_real - fake).square().mean()

    def forward(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Same as :meth:`regularizer`."""
        return self.regularizer(real_logits, fake_logits)


def adaptive_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4, eps: float = 1e-4
) -> Tensor:
    """VQGAN's adaptive adversarial weight (Esser et al. 2021, eq. 7): ``‖∇_L rec‖ / (‖∇_L gan‖ + eps)``.

    ``L`` is ``last_layer``, the decoder's final weight (``Tokenizer.last_layer``): scaling the GAN loss by
    this ratio makes its gradient at the decoder output about as large as the reconstruction loss's, whatever
    the two losses' magnitudes. Both gradients come from ``torch.autograd.grad(..., retain_graph=True)``, so
    the graphs remain for the trainer's ``backward()``, and nothing is accumulated into ``.grad``. The result
    is clamped to ``[0, max_weight]`` and detached (a scalar tensor): it is a weight, not something to
    differentiate. ``gan_loss`` must reach ``last_layer`` through the discriminator, which may be frozen.
    """
    if not math.isfinite(max_weight) or max_weight < 0:
        raise ValueError(f"adaptive_weight: max_weight must be a finite number >= 0, got {max_weight}")
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
