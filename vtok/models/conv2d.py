"""Configurable 2D convolutional encoder and decoder (the VQGAN / LDM layout).

Resolution halves after every level but the last, so ``len(channel_mult)`` levels give
``f = patch_size * 2 ** (len(channel_mult) - 1)``: (1,2,4) → f=4, (1,2,2,4) → f=8, (1,1,2,2,4) → f=16.
``patch_size > 1`` folds pixels into channels first (pixel-unshuffle), a cheap extra ×p reduction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from vtok.errors import ConfigError
from vtok.models.blocks import AttnBlock, Downsample, ResBlock, Upsample, group_norm


@dataclass
class ConvConfig:
    """Shape of an encoder or decoder; the decoder mirrors the encoder's levels.

    ``attn_levels`` lists level indices (0 = full resolution) that get self-attention after each
    residual block; VQGAN f16 puts it at the last level (16×16 for 256 px inputs).
    """

    image_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    z_channels: int = 256
    patch_size: int = 1
    dropout: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        if not self.channel_mult:
            raise ConfigError("channel_mult needs at least one level")
        if self.patch_size < 1 or self.channels < 1 or self.z_channels < 1 or self.num_res_blocks < 0:
            raise ConfigError(f"invalid conv config: {self}")
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.channel_mult)]
        if bad:
            raise ConfigError(f"attn_levels {bad} outside 0..{len(self.channel_mult) - 1}")

    @property
    def downsample(self) -> int:
        """Total spatial reduction factor f."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvConfig:
        """Build from a plain dict, rejecting unknown keys by name."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown conv option(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_levels"] = list(self.attn_levels)
        return d


def _mid(channels: int, cfg: ConvConfig) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(channels, channels, cfg.dropout, cfg.norm_groups)]
    if cfg.mid_attention:
        layers.append(AttnBlock(channels, cfg.norm_groups))
    layers.append(ResBlock(channels, channels, cfg.dropout, cfg.norm_groups))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Images in model range ``(B, image_channels, H, W)`` → latent ``(B, z_channels, H/f, W/f)``."""

    def __init__(self, cfg: ConvConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.image_channels * p * p, cfg.channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = cfg.channels
        for level, mult in enumerate(cfg.channel_mult):
            out = cfg.channels * mult
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, out, cfg.dropout, cfg.norm_groups))
                ch = out
                if level in cfg.attn_levels:
                    blocks.append(AttnBlock(ch, cfg.norm_groups))
            if level != len(cfg.channel_mult) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid(ch, cfg)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, self.cfg.patch_size)
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, z_channels, h, w)`` → images in model range ``(B, image_channels, h*f, w*f)``."""

    def __init__(self, cfg: ConvConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _mid(ch, cfg)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(cfg.channel_mult))):
            out = cfg.channels * cfg.channel_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch, out, cfg.dropout, cfg.norm_groups))
                ch = out
                if level in cfg.attn_levels:
                    blocks.append(AttnBlock(ch, cfg.norm_groups))
            if level != 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        p = cfg.patch_size
        self.conv_out = nn.Conv2d(ch, cfg.image_channels * p * p, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv: where adaptive GAN weighting measures gradient norms."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        x = self.conv_out(F.silu(self.norm_out(h)))
        if self.cfg.patch_size > 1:
            x = F.pixel_shuffle(x, self.cfg.patch_size)
        return x
