"""Diagonal-Gaussian posterior of the KL autoencoder (LDM; Rombach et al. 2022), as a continuous "quantizer".

The encoder predicts a mean and a log-variance per latent channel. Training samples with the
reparameterisation trick (Kingma & Welling 2014) and regularises towards ``N(0, I)`` with a small KL weight;
inference returns the mean (the distribution's mode), so encoding is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vtok.errors import ConfigError
from vtok.quantizers.base import Quantizer, QuantizerOutput


class DiagonalGaussian(Quantizer):
    """``(B, 2·C, *S)`` = (mean, logvar) -> a ``(B, C, *S)`` latent; continuous, no indices.

    - Training with ``sample=True``: ``mean + std · ε`` (reparameterised); otherwise, and always in eval, the
      mean.
    - ``losses["kl"] = kl_weight · KL(q ‖ N(0, I))``, the KL **summed over channels and positions and averaged
      over the batch** (the LDM convention, so the weight ``1e-6`` means what it means there).
    - ``stats``: ``std`` (mean posterior standard deviation) and ``abs_mean`` (mean ``|mean|``).

    ``logvar`` is clamped to ``logvar_clamp`` before use, as in LDM, to keep ``exp`` finite.
    """

    type_name = "kl"
    continuous = True

    def __init__(
        self,
        latent_channels: int,
        kl_weight: float = 1e-6,
        logvar_clamp: Sequence[float] = (-30.0, 20.0),
        sample: bool = True,
    ) -> None:
        super().__init__()
        if latent_channels < 1:
            raise ConfigError(f"kl: latent_channels must be >= 1, got {latent_channels}")
        if len(logvar_clamp) != 2 or float(logvar_clamp[0]) >= float(logvar_clamp[1]):
            raise ConfigError(f"kl: logvar_clamp must be [low, high] with low < high, got {list(logvar_clamp)}")
        self.in_channels = 2 * latent_channels
        self.out_channels = latent_channels
        self.codebook_size = 0
        self.kl_weight = kl_weight
        self.logvar_range = (float(logvar_clamp[0]), float(logvar_clamp[1]))
        self.sample_in_training = sample

    def _split(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.dim() < 2 or z.shape[1] != self.in_channels:
            raise ValueError(f"kl: expected (B, {self.in_channels}, *spatial) (mean, logvar), got {tuple(z.shape)}")
        mean, logvar = z.float().chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_range)

    def mode(self, z: Tensor) -> Tensor:
        """The posterior mode (its mean)."""
        return self._split(z)[0]

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw ``mean + std · ε`` (differentiable in ``z``)."""
        mean, logvar = self._split(z)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def kl(self, z: Tensor) -> Tensor:
        """Unweighted ``KL(N(mean, var) ‖ N(0, I))`` per batch item, summed over channels and positions: ``(B,)``."""
        mean, logvar = self._split(z)
        per_elem = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
        return per_elem.flatten(1).sum(dim=1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            mean, logvar = self._split(z)
            latent = self.sample(z) if (self.training and self.sample_in_training) else mean
            losses = {"kl": self.kl_weight * self.kl(z).mean()}
            with torch.no_grad():
                stats = {"std": torch.exp(0.5 * logvar).mean(), "abs_mean": mean.abs().mean()}
            return QuantizerOutput(quantized=latent, indices=None, losses=losses, stats=stats)
