"""``TokenBatch``: what ``encode`` returns and ``decode`` accepts, for every family and token shape."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """Tokens for a batch of images (or videos) plus what is needed to decode them to the input size.

    - ``ids``: int64 ``(B, *grid)``, or ``(B, *grid, Q)`` when ``Q`` ids describe one position
      (residual levels, groups); ``None`` for continuous tokenizers.
    - ``latents``: float ``(B, C, *grid)`` for continuous tokenizers, else ``None``.
    - ``grid``: the token grid, ``(h, w)`` for images, ``(n,)`` for 1D sequences, ``(t, h, w)`` for video.
    - ``size``: the spatial size of the input before padding, so decoding crops back to it.
    - ``model``: the id of the model that produced the tokens (checked when decoding from a file).
    """

    ids: Tensor | None
    latents: Tensor | None
    grid: tuple[int, ...]
    size: tuple[int, ...]
    model: str | None = None

    def __post_init__(self) -> None:
        if (self.ids is None) == (self.latents is None):
            raise ValueError("a TokenBatch carries exactly one of ids (discrete) or latents (continuous)")
        self.grid = tuple(int(g) for g in self.grid)
        self.size = tuple(int(s) for s in self.size)

    @property
    def discrete(self) -> bool:
        """True when the tokens are integer ids."""
        return self.ids is not None

    @property
    def batch_size(self) -> int:
        """Number of items in the batch."""
        return int((self.ids if self.ids is not None else self.latents).shape[0])  # type: ignore[union-attr]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: torch.device | str) -> TokenBatch:
        """Same tokens on another device."""
        return replace(
            self,
            ids=None if self.ids is None else self.ids.to(device),
            latents=None if self.latents is None else self.latents.to(device),
        )

    def __getitem__(self, item: int | slice) -> TokenBatch:
        """A sub-batch (an int keeps the batch axis)."""
        sl = slice(item, item + 1) if isinstance(item, int) else item
        return replace(
            self,
            ids=None if self.ids is None else self.ids[sl],
            latents=None if self.latents is None else self.latents[sl],
        )
