"""Codebook usage over a sliding window of recent training ids, sized to the codebook.

A single batch cannot show whether a 16k-code codebook is used (it may hold fewer ids than codes), so the
trainer keeps the last ``window`` ids per index slot (default: as many as there are codes, at least 4096)
and reports the fraction of codes seen in it and the number never seen (dead).
"""

from __future__ import annotations

import torch
from torch import Tensor


class UsageWindow:
    """Rolling window of ids per index slot; memory ``O(window · slots)``, independent of the codebook."""

    def __init__(self, codebook_size: int, num_codebooks: int = 1, window: int | None = None):
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.window = window or max(codebook_size, 4096)
        self._ids = torch.full((self.window, num_codebooks), -1, dtype=torch.long)
        self._next = 0
        self.filled = 0

    def update(self, ids: Tensor) -> None:
        """Add a batch of ids ``(B, *grid)`` or ``(B, *grid, Q)``."""
        rows = ids.detach().reshape(-1, self.num_codebooks).to("cpu", torch.long)[-self.window :]
        n = rows.shape[0]
        end = self._next + n
        if end <= self.window:
            self._ids[self._next : end] = rows
        else:
            first = self.window - self._next
            self._ids[self._next :] = rows[:first]
            self._ids[: n - first] = rows[first:]
        self._next = end % self.window
        self.filled = min(self.window, self.filled + n)

    def usage(self) -> tuple[float, int]:
        """(fraction of codes seen in the window, codes never seen), averaged over index slots."""
        if self.filled == 0:
            return 0.0, self.codebook_size
        seen = [torch.unique(self._ids[: self.filled, q]).numel() for q in range(self.num_codebooks)]
        mean_seen = sum(seen) / len(seen)
        return mean_seen / self.codebook_size, round(self.codebook_size - mean_seen)
