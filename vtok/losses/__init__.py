"""Training losses, one concept per file.

``reconstruction``: pixel L1 / L2. ``perceptual``: ST-LPIPS (Ghildyal & Liu 2022). ``adversarial``: PatchGAN
discriminator, hinge / non-saturating losses, LeCAM, VQGAN adaptive weight. ``gram``: Gram-matrix loss on
perceptual features (Gatys et al. 2016; AToken 2025). ``schedules``: GAN warm-up ramp, entropy schedule.
"""

from vtok.losses.adversarial import LeCAM, PatchDiscriminator, adaptive_weight, d_loss, g_loss
from vtok.losses.gram import GramLoss, gram_matrix, stlpips_features
from vtok.losses.perceptual import STLPIPS
from vtok.losses.reconstruction import l1_loss, l2_loss
from vtok.losses.schedules import entropy_scale, gan_ramp

__all__ = [
    "STLPIPS",
    "GramLoss",
    "LeCAM",
    "PatchDiscriminator",
    "adaptive_weight",
    "d_loss",
    "entropy_scale",
    "g_loss",
    "gan_ramp",
    "gram_matrix",
    "l1_loss",
    "l2_loss",
    "stlpips_features",
]
