"""Lookup-free quantization (LFQ; MAGVIT-v2, Yu et al. 2023, arXiv:2310.05737) and the machinery it shares
with BSQ (:mod:`vtok.quantizers.bsq`): sign quantization to bit codes, bit/id conversion, sub-token split
and the entropy penalty over all ``2^K`` codes.

Each of the ``K`` latent channels is quantised to ``±s`` by its sign, so the implicit codebook is
``{±s}^K`` with ``2^K`` codes that are never stored. Token id = the bit pattern read with channel 0 as the
most significant bit (bit = 1 where the value is positive).

**Entropy penalty** (MAGVIT-v2): with the soft assignment ``p_n(c) = softmax_c(-||z_n − c||² / T)``,
``loss = mean_n H(p_n) − γ · H(mean_n p_n)``: confident per-token choices, diverse use over the batch.
Computed exactly without an ``N × 2^K`` matrix:

- ``-||z − c||² / T = 2 z·c / T + const``, and ``z·c`` is a sum over channels, so ``p_n`` is a product of
  independent per-bit Bernoullis, ``p_nk(+) = sigmoid(4 s z_nk / T)``. The per-sample entropy is the sum of
  the per-bit binary entropies.
- Split the bits into a high half (``K1`` bits) and a low half (``K2``): ``p_n(c) = a_n(c1) b_n(c2)``, so
  the batch mean is the matrix ``Aᵀ B / N`` (``A``: ``N × 2^K1``, ``B``: ``N × 2^K2``), one exact matmul.
  Its entropy is accumulated over blocks of rows of ``Aᵀ`` (``chunk_size`` codes at a time) by a custom
  autograd function whose backward recomputes each block instead of keeping all ``2^K`` probabilities.
  Memory: ``O(N (2^K1 + 2^K2) + chunk_size)``; at ``K = 18`` that is two ``N × 512`` matrices.

``entropy_mode="factorized"`` replaces the batch term by ``Σ_k h(mean_n p_nk)`` (binary entropies of the
batch-mean bit probabilities), the cheap approximation used e.g. by BSQ's released code; it is an upper
bound of the exact term (the joint entropy never exceeds the sum of its marginals).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vtok.errors import ConfigError
from vtok.quantizers.base import Quantizer, QuantizerOutput, codebook_stats, from_rows, to_rows

ENTROPY_MODES = ("exact", "factorized")
MAX_BITS = 62  # ids are int64


# --- ids <-> bits --------------------------------------------------------------------------------
def _shifts(num_bits: int, device: torch.device) -> Tensor:
    return torch.arange(num_bits - 1, -1, -1, device=device)


def bits_to_ids(bits: Tensor) -> Tensor:
    """``(..., K)`` bits (bool or 0/1) -> ``(...)`` int64 ids, channel 0 the most significant bit."""
    return (bits.long() << _shifts(bits.shape[-1], bits.device)).sum(dim=-1)


def ids_to_bits(ids: Tensor, num_bits: int) -> Tensor:
    """``(...)`` int64 ids -> ``(..., num_bits)`` bool bits, inverse of :func:`bits_to_ids`."""
    return ((ids.long()[..., None] >> _shifts(num_bits, ids.device)) & 1).bool()


def split_ids(ids: Tensor, sub_token_bits: list[int]) -> Tensor:
    """``(...)`` ids -> ``(..., S)`` sub-token ids; the first sub-token holds the most significant bits."""
    parts = []
    shift = sum(sub_token_bits)
    for bits in sub_token_bits:
        shift -= bits
        parts.append((ids.long() >> shift) & ((1 << bits) - 1))
    return torch.stack(parts, dim=-1)


def merge_ids(parts: Tensor, sub_token_bits: list[int]) -> Tensor:
    """Inverse of :func:`split_ids`: ``(..., S)`` sub-token ids -> ``(...)`` full ids."""
    if parts.shape[-1] != len(sub_token_bits):
        raise ValueError(f"expected {len(sub_token_bits)} sub-tokens on the last axis, got {parts.shape[-1]}")
    ids = torch.zeros(parts.shape[:-1], dtype=torch.long, device=parts.device)
    for j, bits in enumerate(sub_token_bits):
        ids = (ids << bits) | parts[..., j].long()
    return ids


# --- entropies -----------------------------------------------------------------------------------
def _xlogx(p: Tensor) -> Tensor:
    """``p log p`` with ``0 log 0 = 0`` and a finite gradient everywhere on ``p >= 0``."""
    return p * p.clamp_min(torch.finfo(p.dtype).tiny).log()


def _half_code_probs(log_pos: Tensor, log_neg: Tensor) -> Tensor:
    """``(N, k)`` per-bit log-probabilities -> ``(N, 2^k)`` probabilities of every k-bit pattern.

    Summed in log space (each term ``<= 0``, so the dominant pattern keeps full precision), then
    exponentiated; pattern ``c`` reads bit 0 as its most significant bit.
    """
    k = log_pos.shape[1]
    patterns = ids_to_bits(torch.arange(2**k, device=log_pos.device), k).to(log_pos.dtype)  # (2^k, k)
    return torch.exp(log_pos @ patterns.T + log_neg @ (1 - patterns).T)


class _BatchEntropy(torch.autograd.Function):
    """``H(Aᵀ B / n)`` accumulated over blocks of ``rows`` rows of ``Aᵀ``, gradient recomputed per block.

    With ``P = Aᵀ B / n`` and ``G = ∂H/∂P = −(log P + 1)``: ``∂H/∂Aᵀ = G Bᵀ / n`` and ``∂H/∂B = A G / n``.
    Only ``Aᵀ`` and ``B`` are saved (plus ``P`` itself when it is a single block), so backward never holds
    more than one block of the ``2^K`` batch-mean distribution.
    """

    @staticmethod
    def forward(ctx: Any, a_t: Tensor, b: Tensor, n: int, rows: int) -> Tensor:
        total = a_t.new_zeros(())
        single = rows >= a_t.shape[0]
        p = a_t.new_zeros(0)
        for start in range(0, a_t.shape[0], rows):
            p = (a_t[start : start + rows] @ b) / n
            total -= _xlogx(p).sum()
        ctx.save_for_backward(a_t, b, p if single else a_t.new_zeros(0))
        ctx.n, ctx.rows, ctx.single = n, rows, single
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        a_t, b, saved_p = ctx.saved_tensors
        scale = grad / ctx.n
        d_a_t = torch.empty_like(a_t) if ctx.needs_input_grad[0] else None
        d_b = torch.zeros_like(b) if ctx.needs_input_grad[1] else None
        tiny = torch.finfo(a_t.dtype).tiny
        for start in range(0, a_t.shape[0], ctx.rows):
            block = a_t[start : start + ctx.rows]
            p = saved_p if ctx.single else (block @ b) / ctx.n
            g = (p.clamp_min(tiny).log() + 1) * -scale  # −(log P + 1) · grad / n
            if d_a_t is not None:
                d_a_t[start : start + ctx.rows] = g @ b.T
            if d_b is not None:
                d_b += block.T @ g
        return d_a_t, d_b, None, None


def exact_codebook_entropy(log_pos: Tensor, log_neg: Tensor, chunk_size: int = 2**18) -> Tensor:
    """Entropy (nats) of ``mean_n Π_k Bernoulli(p_nk)`` over all ``2^K`` codes, without an ``N × 2^K`` matrix.

    ``log_pos``/``log_neg``: ``(N, K)`` log-probabilities of each bit being 1/0. At most
    ``max(chunk_size, 2^ceil(K/2))`` entries of the batch-mean distribution exist at once, forward and
    backward.
    """
    n, k = log_pos.shape
    k1 = k // 2
    a_t = _half_code_probs(log_pos[:, :k1], log_neg[:, :k1]).T  # (2^k1, N): high-half patterns
    b = _half_code_probs(log_pos[:, k1:], log_neg[:, k1:])  # (N, 2^k2): low-half patterns
    rows = max(1, chunk_size // b.shape[1])
    return _BatchEntropy.apply(a_t, b, n, rows)


def binary_entropies(
    z: Tensor, scale: float, temperature: float, mode: str = "exact", chunk_size: int = 2**18
) -> tuple[Tensor, Tensor]:
    """Mean per-sample entropy and batch (codebook) entropy, in nats, of ``softmax_c(-||z − c||² / T)``.

    ``z``: ``(N, K)`` rows; codes ``c ∈ {±scale}^K``. ``mode="exact"`` gives the entropy of the batch-mean
    distribution over all ``2^K`` codes; ``"factorized"`` the sum of per-bit entropies of the batch-mean bit
    probabilities (an upper bound). The per-sample term is exact in both modes.
    """
    if mode not in ENTROPY_MODES:
        raise ValueError(f"entropy mode must be one of {ENTROPY_MODES}, got {mode!r}")
    logits = z * (4.0 * scale / temperature)  # log p(+) − log p(−) per bit
    log_pos, log_neg = F.logsigmoid(logits), F.logsigmoid(-logits)
    p_pos = torch.sigmoid(logits)
    sample = -(p_pos * log_pos + (1 - p_pos) * log_neg).sum(dim=1).mean()
    if mode == "exact":
        batch = exact_codebook_entropy(log_pos, log_neg, chunk_size)
    else:
        mean_pos = p_pos.mean(dim=0)
        batch = -(_xlogx(mean_pos) + _xlogx(1 - mean_pos)).sum()
    return sample, batch


# --- the shared quantizer ------------------------------------------------------------------------
class BinaryQuantizer(Quantizer):
    """Shared body of LFQ and BSQ: optional projection, sign quantization, ids, losses, sub-tokens.

    Subclasses choose the latent the signs are taken of (:meth:`_latent`) and the code magnitude
    (:attr:`code_scale`). Entropy terms are computed in training mode only (they regularise training and
    cost a ``2^K1 × N × 2^K2`` matmul, which encoding should not pay).
    """

    def __init__(
        self,
        dim: int,
        codebook_dim: int | None = None,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_weight: float = 1.0,
        temperature: float = 0.01,
        entropy_mode: str = "exact",
        sub_token_bits: list[int] | None = None,
        chunk_size: int = 2**18,
    ) -> None:
        super().__init__()
        name = self.type_name
        bits = dim if codebook_dim is None else codebook_dim
        if dim < 1 or not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"{name}: need dim >= 1 and 1 <= codebook_dim <= {MAX_BITS}, "
                              f"got dim={dim}, codebook_dim={codebook_dim}")
        if temperature <= 0:
            raise ConfigError(f"{name}: temperature must be > 0, got {temperature}")
        if entropy_mode not in ENTROPY_MODES:
            raise ConfigError(f"{name}: entropy_mode must be one of {list(ENTROPY_MODES)}, got {entropy_mode!r}")
        if chunk_size < 1:
            raise ConfigError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
        if sub_token_bits is not None and (sum(sub_token_bits) != bits or min(sub_token_bits, default=0) < 1):
            raise ConfigError(f"{name}: sub_token_bits {sub_token_bits} must be positive and sum to the "
                              f"{bits} code bits")
        self.in_channels = self.out_channels = dim
        self.num_bits = bits
        self.codebook_size = 2**bits
        self.entropy_weight = entropy_weight
        self.commitment_weight = commitment_weight
        self.diversity_weight = diversity_weight
        self.temperature = temperature
        self.entropy_mode = entropy_mode
        self.sub_token_bits = None if sub_token_bits is None else [int(b) for b in sub_token_bits]
        self.chunk_size = chunk_size
        project = bits != dim
        self.project_in: nn.Module = nn.Linear(dim, bits) if project else nn.Identity()
        self.project_out: nn.Module = nn.Linear(bits, dim) if project else nn.Identity()

    # --- subclass hooks ----------------------------------------------------------------------------
    @property
    def code_scale(self) -> float:
        """Magnitude ``s`` of every code coordinate."""
        raise NotImplementedError

    def _latent(self, x: Tensor) -> Tensor:
        """The ``(N, K)`` values whose signs are the bits (after the input projection)."""
        return x

    # --- contract ----------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            rows, shape = to_rows(z.float())
            latent = self._latent(self.project_in(rows))
            positive = latent > 0
            s = self.code_scale
            codes = torch.where(positive, latent.new_tensor(s), latent.new_tensor(-s))
            # straight-through: forward value = the code, gradient = identity to the latent
            quantized = latent + (codes - latent).detach() if latent.requires_grad else codes
            indices = bits_to_ids(positive).reshape(shape)
            losses = {"commitment": self.commitment_weight * F.mse_loss(latent, codes)}
            stats = codebook_stats(indices, self.codebook_size)
            if self.training:
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.entropy_weight != 0):
                    sample_h, batch_h = binary_entropies(latent, s, self.temperature, self.entropy_mode,
                                                         self.chunk_size)
                losses["entropy"] = self.entropy_weight * (sample_h - self.diversity_weight * batch_h)
                stats["sample_entropy"] = sample_h.detach()
                stats["codebook_entropy"] = batch_h.detach()
            out = self.project_out(quantized)
            return QuantizerOutput(quantized=from_rows(out, shape), indices=indices, losses=losses, stats=stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``(B, *S)`` ids -> ``(B, dim, *S)``: the codes ``±s`` of each bit, then the output projection."""
        bits = ids_to_bits(indices, self.num_bits)
        s = self.code_scale
        dtype = torch.float32
        codes = torch.where(bits, torch.tensor(s, dtype=dtype, device=bits.device),
                            torch.tensor(-s, dtype=dtype, device=bits.device))
        with torch.autocast(device_type=bits.device.type, enabled=False):
            return self.project_out(codes).movedim(-1, 1)

    # --- sub-tokens (Open-MAGVIT2's asymmetric token factorization, Luo et al. 2024) ---------------
    @property
    def sub_vocab_sizes(self) -> tuple[int, ...]:
        """``2^b`` for each sub-token when ``sub_token_bits`` is set, else ``(2^K,)``."""
        if self.sub_token_bits is None:
            return (self.codebook_size,)
        return tuple(2**b for b in self.sub_token_bits)

    def split_indices(self, indices: Tensor) -> Tensor:
        """Full ids ``(...)`` -> sub-token ids ``(..., S)``, most significant bits first (``S = 1`` unsplit)."""
        return split_ids(indices, self.sub_token_bits or [self.num_bits])

    def merge_indices(self, parts: Tensor) -> Tensor:
        """Sub-token ids ``(..., S)`` -> full ids ``(...)``; inverse of :meth:`split_indices`."""
        return merge_ids(parts, self.sub_token_bits or [self.num_bits])


class LFQ(BinaryQuantizer):
    """Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): each channel -> ``±codebook_scale`` by sign.

    ``K = codebook_dim or dim`` bits (linear projections ``dim -> K -> dim`` when they differ);
    ``codebook_size = 2^K``; id = bit pattern, channel 0 the most significant bit.

    Losses (already weighted): ``commitment = commitment_weight · mse(z, sg(q))``; in training mode also
    ``entropy = entropy_weight · (mean per-sample entropy − diversity_weight · codebook entropy)`` of
    ``softmax(-||z − c||² / temperature)`` (exact over all ``2^K`` codes, or ``entropy_mode="factorized"``).
    Stats: ``usage``, ``perplexity``, and in training ``sample_entropy`` / ``codebook_entropy`` in **nats**.

    ``sub_token_bits`` (e.g. ``[6, 12]``, Open-MAGVIT2, Luo et al. 2024) only changes how ids are exposed to
    a generator (:meth:`split_indices`, :attr:`sub_vocab_sizes`); indices at this API stay full ids.
    """

    type_name = "lfq"

    def __init__(
        self,
        dim: int,
        codebook_dim: int | None = None,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_weight: float = 1.0,
        temperature: float = 0.01,
        entropy_mode: str = "exact",
        sub_token_bits: list[int] | None = None,
        chunk_size: int = 2**18,
        codebook_scale: float = 1.0,
    ) -> None:
        if not codebook_scale > 0:
            raise ConfigError(f"lfq: codebook_scale must be > 0, got {codebook_scale}")
        super().__init__(dim, codebook_dim, entropy_weight, commitment_weight, diversity_weight, temperature,
                         entropy_mode, sub_token_bits, chunk_size)
        self.codebook_scale = float(codebook_scale)

    @property
    def code_scale(self) -> float:
        return self.codebook_scale


__all__ = [
    "LFQ",
    "BinaryQuantizer",
    "binary_entropies",
    "bits_to_ids",
    "exact_codebook_entropy",
    "ids_to_bits",
    "merge_ids",
    "split_ids",
]
