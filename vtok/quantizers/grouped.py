"""Grouped (product) quantization: split the channels into groups and quantize each on its own.

``G`` groups of ``K`` codes describe ``K^G`` combinations with only ``G·K`` code vectors, which is how
multi-codebook tokenizers reach large effective vocabularies (product quantization, Jégou et al. 2011;
multi-codebook visual tokenizers such as UniTok and WeTok, 2025).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vtok.errors import ConfigError
from vtok.quantizers.base import Quantizer, QuantizerOutput, build_quantizer, check_composable, codebook_stats


class GroupedQuantizer(Quantizer):
    """``groups`` copies of a discrete base quantizer, each on a contiguous slice of the channels.

    - Channels: ``in_channels = G · base.in_channels``; group ``g`` reads channels
      ``[g·c, (g+1)·c)`` and writes its output slice in the same order.
    - Indices ``(B, *S, G)``; ``codebook_size`` is the base's.
    - ``shared_codebook``: one base module (one codebook) for all groups.
    - Losses: each name the base reports is **averaged over groups**, so for equal group sizes an MSE-type
      term equals that term over all channels and its scale does not change with ``G``.
    - Stats: every stat the groups report, averaged over groups (``usage``, ``perplexity`` included).
    """

    type_name = "grouped"

    def __init__(self, quantizer: dict[str, Any], groups: int, shared_codebook: bool = False) -> None:
        super().__init__()
        if groups < 1:
            raise ConfigError(f"grouped: groups must be >= 1, got {groups}")
        members = [build_quantizer(quantizer) for _ in range(1 if shared_codebook else groups)]
        base = members[0]
        check_composable(base, "grouped")
        self.members = nn.ModuleList(members)
        self.groups = groups
        self.shared_codebook = shared_codebook
        self.group_in = base.in_channels
        self.group_out = base.out_channels
        self.in_channels = groups * base.in_channels
        self.out_channels = groups * base.out_channels
        self.codebook_size = base.codebook_size
        self.num_codebooks = groups

    def group(self, g: int) -> Quantizer:
        """The quantizer used for group ``g`` (the same module for every group when shared)."""
        return self.members[0 if self.shared_codebook else g]  # type: ignore[return-value]

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.dim() < 2 or z.shape[1] != self.in_channels:
            raise ValueError(f"grouped: expected (B, {self.in_channels}, *spatial), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            parts = z.float().split(self.group_in, dim=1)
            quantized, indices = [], []
            losses: dict[str, list[Tensor]] = {}
            stat_lists: dict[str, list[Tensor]] = {}
            for g, part in enumerate(parts):
                out = self.group(g)(part)
                quantized.append(out.quantized)
                assert out.indices is not None
                indices.append(out.indices)
                for name, value in out.losses.items():
                    losses.setdefault(name, []).append(value)
                for name, value in out.stats.items():
                    stat_lists.setdefault(name, []).append(value.detach().float())
            idx = torch.stack(indices, dim=-1)
            mean_losses = {k: torch.stack(v).mean() for k, v in losses.items()}
            stats = {k: torch.stack(v).mean() for k, v in stat_lists.items() if len(v) == self.groups}
            if "usage" not in stats or "perplexity" not in stats:
                stats.update(codebook_stats(idx, self.codebook_size, self.groups))
            # contiguous here and in indices_to_codes: downstream convs can round differently per memory layout
            return QuantizerOutput(quantized=torch.cat(quantized, dim=1).contiguous(), indices=idx,
                                   losses=mean_losses, stats=stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``(B, *S, G)`` ids -> ``(B, G·c_out, *S)``, each group's codes in its channel slice."""
        if indices.dim() < 2 or indices.shape[-1] != self.groups:
            raise ValueError(f"grouped: indices need a trailing group axis of size {self.groups}, "
                             f"got shape {tuple(indices.shape)}")
        codes = [self.group(g).indices_to_codes(indices[..., g]) for g in range(self.groups)]
        return torch.cat(codes, dim=1).contiguous()
