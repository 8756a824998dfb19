"""Residual quantization (RQ-VAE, Lee et al. 2022; SoundStream, Zeghidour et al. 2021).

Quantize ``z``, subtract the result, quantize what is left with the next level, and so on; the quantized
latent is the sum over levels, so each extra level refines the previous approximation and a prefix of the
levels decodes a coarser one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vtok.errors import ConfigError
from vtok.quantizers.base import Quantizer, QuantizerOutput, build_quantizer, check_composable, codebook_stats


class ResidualQuantizer(Quantizer):
    """``num_quantizers`` levels of any discrete base quantizer applied to successive residuals.

    - Indices ``(B, *S, Q)``: level ``l`` at ``[..., l]``; ``codebook_size`` is the base's.
    - ``shared_codebook``: one base module (and codebook) for every level (RQ-VAE shares it).
    - Gradients follow the plain graph ``r_{l+1} = r_l − q_l`` (as EnCodec and DAC do), so with
      straight-through bases the whole stack passes ``∂L/∂quantized`` to ``z`` unchanged.
    - Losses: each name the base reports (e.g. ``commitment``, ``codebook``) is **summed over levels** into
      that same name, so log keys do not depend on ``Q``.
    - Stats: every stat the levels report, averaged over levels (``usage``, ``perplexity`` included).
    - Quantizer dropout (SoundStream): in training, each batch item independently, with probability
      ``quantizer_dropout``, keeps only its first ``n ~ U{dropout_min_levels..Q}`` levels in ``quantized``, so
      the decoder learns to work from coarse prefixes. Every level is still computed (and its losses count)
      for every item, and ``indices`` carry all ``Q`` levels; eval always uses all levels.
    """

    type_name = "residual"

    def __init__(
        self,
        quantizer: dict[str, Any],
        num_quantizers: int,
        shared_codebook: bool = False,
        quantizer_dropout: float = 0.0,
        dropout_min_levels: int = 1,
    ) -> None:
        super().__init__()
        if num_quantizers < 1:
            raise ConfigError(f"residual: num_quantizers must be >= 1, got {num_quantizers}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ConfigError(f"residual: quantizer_dropout must be in [0, 1], got {quantizer_dropout}")
        if not 1 <= dropout_min_levels <= num_quantizers:
            raise ConfigError(
                f"residual: dropout_min_levels must be in [1, num_quantizers={num_quantizers}], "
                f"got {dropout_min_levels}"
            )
        levels = [build_quantizer(quantizer) for _ in range(1 if shared_codebook else num_quantizers)]
        base = levels[0]
        check_composable(base, "residual")
        if base.in_channels != base.out_channels:
            raise ConfigError(
                f"residual: base quantizer {base.type_name!r} maps {base.in_channels} -> {base.out_channels} "
                "channels, but residuals need in_channels == out_channels"
            )
        self.levels = nn.ModuleList(levels)
        self.num_quantizers = num_quantizers
        self.shared_codebook = shared_codebook
        self.quantizer_dropout = quantizer_dropout
        self.dropout_min_levels = dropout_min_levels
        self.in_channels = self.out_channels = base.in_channels
        self.codebook_size = base.codebook_size
        self.num_codebooks = num_quantizers

    def level(self, i: int) -> Quantizer:
        """The quantizer used at level ``i`` (the same module for every level when shared)."""
        return self.levels[0 if self.shared_codebook else i]  # type: ignore[return-value]

    def _kept_levels(self, z: Tensor) -> Tensor | None:
        """Per-item number of levels kept by quantizer dropout, or ``None`` when all are kept."""
        if not self.training or self.quantizer_dropout <= 0.0:
            return None
        batch = z.shape[0]
        drop = torch.rand(batch, device=z.device) < self.quantizer_dropout
        n = torch.randint(self.dropout_min_levels, self.num_quantizers + 1, (batch,), device=z.device)
        return torch.where(drop, n, torch.full_like(n, self.num_quantizers))

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.float()
            kept = self._kept_levels(residual)
            quantized = torch.zeros_like(residual)
            indices, losses = [], {}
            stat_lists: dict[str, list[Tensor]] = {}
            for i in range(self.num_quantizers):
                out = self.level(i)(residual)
                q = out.quantized
                residual = residual - q
                if kept is not None:
                    mask = (kept > i).to(q.dtype).reshape(-1, *([1] * (q.dim() - 1)))
                    quantized = quantized + q * mask
                else:
                    quantized = quantized + q
                assert out.indices is not None
                indices.append(out.indices)
                for name, value in out.losses.items():
                    losses[name] = losses[name] + value if name in losses else value
                for name, value in out.stats.items():
                    stat_lists.setdefault(name, []).append(value.detach().float())
            idx = torch.stack(indices, dim=-1)
            stats = {k: torch.stack(v).mean() for k, v in stat_lists.items() if len(v) == self.num_quantizers}
            if "usage" not in stats or "perplexity" not in stats:
                stats.update(codebook_stats(idx, self.codebook_size, self.num_quantizers))
            # contiguous here and in indices_to_codes: downstream convs can round differently per memory layout
            return QuantizerOutput(quantized=quantized.contiguous(), indices=idx, losses=losses, stats=stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``(B, *S, q)`` ids -> the sum of the first ``q`` levels' codes, ``(B, C, *S)``.

        ``q == Q`` reproduces ``quantized`` exactly; ``q < Q`` (a prefix of the levels, e.g. after
        truncating the index tensor) decodes the coarser approximation those levels describe.
        """
        depth = indices.shape[-1]
        if indices.dim() < 2 or not 1 <= depth <= self.num_quantizers:
            raise ValueError(
                f"residual: indices need a trailing level axis of size 1..{self.num_quantizers}, "
                f"got shape {tuple(indices.shape)}"
            )
        codes = self.level(0).indices_to_codes(indices[..., 0])
        for i in range(1, depth):
            codes = codes + self.level(i).indices_to_codes(indices[..., i])
        return codes.contiguous()
