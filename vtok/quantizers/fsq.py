"""Finite scalar quantization (FSQ; Mentzer et al. 2023, arXiv:2309.15505, "Finite Scalar Quantization:
VQ-VAE Made Simple").

Each of the ``d = len(levels)`` channels is squashed by a shifted ``tanh`` into a range that holds exactly
``L_i`` integers and rounded with a straight-through gradient. The codebook is the grid of all level
combinations, ``prod(levels)`` codes, implicit and never materialised; nothing is learned and there is no
auxiliary loss.

Bound for a channel with ``L`` levels (the paper's Appendix A.1), ``ε = 1e-3``::

    h = (L − 1)(1 + ε) / 2,   o = 0.5 if L is even else 0,   b(z) = tanh(z + atanh(o / h)) · h − o

``b`` ranges over ``(−h − o, h − o)``, so ``round(b)`` takes exactly the ``L`` integers
``−⌊L/2⌋ … L − 1 − ⌊L/2⌋`` (the ``ε`` makes the two extremes reachable; the half-step offset ``o`` handles
even ``L``; the ``atanh`` shift keeps ``b(0) = 0``). Codes are ``round(b) / ⌊L/2⌋``: ``L`` evenly spaced
values in ``[−1, 1]``, symmetric for odd ``L`` and ``{−1, …, 1 − 2/L}`` for even ``L``, as in the paper.

Index = mixed-radix number of the per-channel level indices ``d_i = round(b_i) + ⌊L_i/2⌋`` with channel 0
the most significant digit (the same convention as LFQ/BSQ bits). vector-quantize-pytorch's ``FSQ`` uses
the reverse digit order (channel 0 least significant): its id for ``(levels, z)`` equals ours for
``(levels[::-1], z with channels reversed)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vtok.errors import ConfigError
from vtok.quantizers.base import Quantizer, QuantizerOutput, codebook_stats, from_rows, to_rows

_EPS = 1e-3


class FSQ(Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023): per-channel bounded rounding, implicit codebook.

    ``levels``: number of values per channel (each >= 3; two levels make the tanh bound degenerate, use
    ``lfq`` for binary codes). ``dim``: if given and different from ``len(levels)``, linear projections
    ``dim -> len(levels) -> dim`` wrap the quantizer and ``in_channels = out_channels = dim``.
    ``codebook_size = prod(levels)``. No losses; stats ``usage`` and ``perplexity``.
    """

    type_name = "fsq"

    def __init__(self, levels: list[int], dim: int | None = None) -> None:
        super().__init__()
        if not levels or any(int(lv) != lv or lv < 3 for lv in levels):
            raise ConfigError(f"fsq: levels must be a non-empty list of integers >= 3, got {levels} "
                              "(for 2 levels per channel use the 'lfq' quantizer)")
        if dim is not None and dim < 1:
            raise ConfigError(f"fsq: dim must be >= 1, got {dim}")
        self.levels = [int(lv) for lv in levels]
        d = len(self.levels)
        self.in_channels = self.out_channels = d if dim is None else dim
        self.codebook_size = math.prod(self.levels)
        if self.codebook_size >= 2**62:
            raise ConfigError(f"fsq: prod(levels) = {self.codebook_size} does not fit int64 ids")
        project = dim is not None and dim != d
        self.project_in: nn.Module = nn.Linear(self.in_channels, d) if project else nn.Identity()
        self.project_out: nn.Module = nn.Linear(d, self.in_channels) if project else nn.Identity()

        radix = [math.prod(self.levels[i + 1 :]) for i in range(d)]
        # integer constants derived from `levels` (not saved: the config rebuilds them; integer buffers are
        # also immune to `module.to(dtype)`)
        self.register_buffer("_levels", torch.tensor(self.levels), persistent=False)
        self.register_buffer("_half_width", torch.tensor([lv // 2 for lv in self.levels]), persistent=False)
        self.register_buffer("_radix", torch.tensor(radix), persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        """Squash ``(N, d)`` rows so that rounding yields exactly ``L_i`` integers per channel."""
        levels = self._levels.to(z.dtype)
        half_l = (levels - 1) * (1 + _EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            rows, shape = to_rows(z.float())
            bounded = self.bound(self.project_in(rows))
            rounded = torch.round(bounded)
            if bounded.requires_grad:  # straight-through: value of round, gradient of identity
                rounded_st = bounded + (rounded - bounded).detach()
            else:
                rounded_st = rounded
            codes = rounded_st / self._half_width.to(rounded.dtype)
            digits = rounded.long() + self._half_width
            indices = (digits * self._radix).sum(dim=-1).reshape(shape)
            out = self.project_out(codes)
            stats = codebook_stats(indices, self.codebook_size)
            return QuantizerOutput(quantized=from_rows(out, shape), indices=indices, losses={}, stats=stats)

    def indices_to_digits(self, indices: Tensor) -> Tensor:
        """``(...)`` ids -> ``(..., d)`` per-channel level indices in ``[0, L_i)`` (channel 0 most significant)."""
        return torch.div(indices.long()[..., None], self._radix, rounding_mode="floor") % self._levels

    def digits_to_indices(self, digits: Tensor) -> Tensor:
        """Inverse of :meth:`indices_to_digits`."""
        return (digits.long() * self._radix).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``(B, *S)`` ids -> ``(B, dim, *S)``: grid values ``(d_i − ⌊L_i/2⌋) / ⌊L_i/2⌋``, then ``project_out``."""
        half_width = self._half_width
        codes = (self.indices_to_digits(indices) - half_width).float() / half_width.float()
        with torch.autocast(device_type=codes.device.type, enabled=False):
            return self.project_out(codes).movedim(-1, 1)
