"""Index Backpropagation Quantization (IBQ; Shi et al. 2024, arXiv:2412.02692, "Taming Scalable Visual
Tokenizer for Autoregressive Image Generation", v2 retitled "Scalable Image Tokenization with Index
Backpropagation Quantization").

Plain VQ updates only the codes it selects, so unused codes drift away from the encoder's features and the
codebook collapses as it grows. IBQ picks the code with the largest logit ``z·e_k / T`` but routes the
gradient through the softmax over *all* codes, a straight-through estimator on the one-hot index::

    H = onehot(argmax L) - sg(softmax L) + softmax L,      q = H E,      L = z Eᵀ / T

so the forward value is exactly ``E[argmax]`` while every code receives a gradient.

Memory: written densely this needs several ``N × K`` matrices, which at ``K = 2^18`` codes does not fit.
:class:`_IBQFunction` never forms one: the forward pass streams over blocks of codes with an online
log-sum-exp (running max, rescaled sums) and the backward pass recomputes each block's logits. With
``S = softmax(L)``, ``y = S E`` and upstream gradient ``dq`` (straight-through: ``dq`` reaches ``S`` as if
``q`` were ``S E``)::

    dL = S ⊙ (dq Eᵀ − (dq·y) 1ᵀ)          dz = dL E / T          dE = dLᵀ z / T + onehotᵀ dq

(the hard path ``onehot E`` contributes ``onehotᵀ dq``; ``sg(S) E`` cancels the ``Sᵀ dq`` of ``S E``).
A ``soft`` mode of the same function returns ``y = S E`` itself with its exact gradient
(``dE = dLᵀ z / T + Sᵀ dq``), which is what ``torch.autograd.gradcheck`` can verify numerically.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtok.errors import ConfigError
from vtok.quantizers.base import Quantizer, QuantizerOutput, codebook_stats, from_rows, to_rows


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _row_block(chunk_size: int) -> int:
    """Rows processed together: at least 256 so tiny code chunks do not loop over single rows."""
    return max(256, chunk_size)


def _ibq_forward(
    z: Tensor, codebook: Tensor, temperature: float, chunk_size: int, need_soft: bool, need_entropy: bool
) -> dict[str, Tensor]:
    """Stream over code blocks: argmax, log-sum-exp and (optionally) ``y = softmax(L) E`` and entropies.

    Returns ``idx`` always; ``lse``, ``y``, ``h`` (per-row entropy) when ``need_soft``; ``mean_probs``
    (batch-mean softmax, length K) when ``need_entropy`` (which implies ``need_soft``).
    """
    n, k = z.shape[0], codebook.shape[0]
    need_soft = need_soft or need_entropy
    idx = torch.empty(n, dtype=torch.long, device=z.device)
    out: dict[str, Tensor] = {"idx": idx}
    if need_soft:
        lse = z.new_empty(n)
        y = z.new_empty(n, codebook.shape[1])
        h = z.new_empty(n)
        out.update(lse=lse, y=y, h=h)
    if need_entropy:
        mean_probs = z.new_zeros(k)
        out["mean_probs"] = mean_probs
    inv_t = 1.0 / temperature
    for rows in _blocks(n, _row_block(chunk_size)):
        zr = z[rows]
        best = zr.new_full((zr.shape[0],), -math.inf)
        best_idx = torch.zeros(zr.shape[0], dtype=torch.long, device=z.device)
        if need_soft:
            run_sum = zr.new_zeros(zr.shape[0])  # Σ exp(L - best)
            run_y = zr.new_zeros(zr.shape[0], codebook.shape[1])  # Σ exp(L - best) e_k
            run_l = zr.new_zeros(zr.shape[0])  # Σ exp(L - best) L
        for codes in _blocks(k, chunk_size):
            logits = (zr @ codebook[codes].T) * inv_t
            block_max, block_arg = logits.max(dim=1)
            better = block_max > best  # strict: ties keep the lowest index, like torch.argmax
            best_idx = torch.where(better, block_arg + codes.start, best_idx)
            new_best = torch.maximum(best, block_max)
            if need_soft:
                rescale = torch.exp(best - new_best)
                p = torch.exp(logits - new_best[:, None])
                run_sum = run_sum * rescale + p.sum(dim=1)
                run_y = run_y * rescale[:, None] + p @ codebook[codes]
                run_l = run_l * rescale + (p * logits).sum(dim=1)
            best = new_best
        idx[rows] = best_idx
        if need_soft:
            row_lse = best + torch.log(run_sum)
            lse[rows] = row_lse
            y[rows] = run_y / run_sum[:, None]
            h[rows] = row_lse - run_l / run_sum  # entropy of softmax(L): lse − E_S[L]
            if need_entropy:
                for codes in _blocks(k, chunk_size):
                    logits = (zr @ codebook[codes].T) * inv_t
                    mean_probs[codes] += torch.exp(logits - row_lse[:, None]).sum(dim=0)
    if need_entropy:
        mean_probs /= n
    return out


class _IBQFunction(torch.autograd.Function):
    """Chunked IBQ: ``(z, E) -> (q, idx, mean per-row entropy, entropy of the batch-mean distribution)``.

    ``straight_through=True``: ``q = E[argmax]`` with the IBQ gradient; ``False``: ``q = softmax(L) E``
    with its exact gradient. Entropies are exact smooth functions of ``z, E`` (zeros unless requested).
    """

    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        codebook: Tensor,
        temperature: float,
        chunk_size: int,
        straight_through: bool,
        need_entropy: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        res = _ibq_forward(z, codebook, temperature, chunk_size, need_soft=True, need_entropy=need_entropy)
        idx, y, h = res["idx"], res["y"], res["h"]
        q = codebook[idx] if straight_through else y.clone()
        zero = z.new_zeros(())
        if need_entropy:
            mp = res["mean_probs"]
            log_mp = torch.log(mp.clamp_min(torch.finfo(mp.dtype).tiny))
            sample_entropy = h.mean()
            batch_entropy = -(mp * log_mp).sum()
        else:
            log_mp = z.new_zeros(0)
            sample_entropy, batch_entropy = zero, zero.clone()
        ctx.save_for_backward(z, codebook, idx, res["lse"], y, h, log_mp)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.straight_through, ctx.need_entropy = straight_through, need_entropy
        ctx.mark_non_differentiable(idx)
        return q, idx, sample_entropy, batch_entropy

    @staticmethod
    def backward(
        ctx: Any, dq: Tensor | None, _didx: Tensor | None, d_sample: Tensor | None, d_batch: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        z, codebook, idx, lse, y, h, log_mp = ctx.saved_tensors
        inv_t = 1.0 / ctx.temperature
        n, k = z.shape[0], codebook.shape[0]
        chunk = ctx.chunk_size
        if dq is None:
            dq = torch.zeros_like(y)
        dq = dq.to(z.dtype)
        use_entropy = ctx.need_entropy and (d_sample is not None or d_batch is not None)
        g_s = float(d_sample) / n if (use_entropy and d_sample is not None) else 0.0
        g_b = float(d_batch) / n if (use_entropy and d_batch is not None) else 0.0
        dq_dot_y = (dq * y).sum(dim=1)
        # r_i = Σ_k S_ik log p̄_k, needed by the batch-entropy gradient; one extra pass only when used.
        r = z.new_zeros(n)
        if g_b != 0.0:
            for rows in _blocks(n, _row_block(chunk)):
                for codes in _blocks(k, chunk):
                    s = torch.exp((z[rows] @ codebook[codes].T) * inv_t - lse[rows, None])
                    r[rows] += s @ log_mp[codes]
        dz = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        de = torch.zeros_like(codebook) if ctx.needs_input_grad[1] else None
        for rows in _blocks(n, _row_block(chunk)):
            zr, dqr = z[rows], dq[rows]
            for codes in _blocks(k, chunk):
                ec = codebook[codes]
                logits = (zr @ ec.T) * inv_t
                s = torch.exp(logits - lse[rows, None])
                if de is not None and not ctx.straight_through:
                    de[codes] += s.T @ dqr  # direct term of y = S E
                g = dqr @ ec.T
                g -= dq_dot_y[rows, None]
                if g_s != 0.0:  # d(mean_i H(S_i))/dL = −S ⊙ (log S + h) / N
                    g -= g_s * (logits - lse[rows, None] + h[rows, None])
                if g_b != 0.0:  # d H(p̄)/dL = S ⊙ (r − log p̄) / N
                    g += g_b * (r[rows, None] - log_mp[codes][None, :])
                dl = s.mul_(g)
                if dz is not None:
                    dz[rows] += (dl @ ec) * inv_t
                if de is not None:
                    de[codes] += (dl.T @ zr) * inv_t
        if de is not None and ctx.straight_through:
            de.index_add_(0, idx, dq)
        return dz, de, None, None, None, None


def ibq_quantize(
    z: Tensor,
    codebook: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    straight_through: bool = True,
    entropy: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chunked IBQ on rows ``z (N, d)`` and ``codebook (K, d)``.

    Returns ``(q, idx, sample_entropy, batch_entropy)``: ``q`` is ``E[idx]`` with the IBQ gradient
    (``straight_through=True``) or ``softmax(zEᵀ/T) E`` (``False``); the entropies (natural log) are the
    mean per-row entropy of the softmax and the entropy of its batch mean, zeros unless ``entropy``.
    Peak extra memory is a few ``rows × chunk_size`` blocks, never ``N × K``.
    """
    return _IBQFunction.apply(z, codebook, float(temperature), int(chunk_size), straight_through, entropy)


class IBQ(Quantizer):
    """Index Backpropagation Quantization (Shi et al. 2024): argmax of ``z·e/T``, gradient to all codes.

    Losses (already weighted):

    - ``commitment`` = ``beta · mse(z, sg(E[idx]))``, the VQ-VAE commitment term.
    - ``codebook`` = ``mse(E[idx], sg(z)) + mse(q_st, sg(z))``: the paper's *double quantization* loss,
      which pulls both the selected code (plain VQ codebook term) and the straight-through quantized
      feature ``q_st = H E`` (whose gradient reaches every code through the softmax) towards the feature.
      The authors' release leaves ``z`` un-detached in the second term; we stop it so that the pull on the
      encoder's value is set by ``beta`` alone (``q_st`` still passes its softmax gradient to ``z``).
    - ``entropy`` (only when ``entropy_weight > 0``) = ``entropy_weight · (mean per-token entropy of
      softmax(L) − entropy of the batch-mean softmax)``: confident per-token choices, diverse batch usage
      (the entropy penalty of MAGVIT-v2, Yu et al. 2023, used optionally by IBQ). It reuses ``L = zEᵀ/T``.

    ``chunk_size`` codes are scored at a time (forward and backward), so memory stays bounded at
    ``K = 2^18``. Codes start uniform in ``±1/K`` as in the authors' release.
    """

    type_name = "ibq"

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        beta: float = 0.25,
        temperature: float = 1.0,
        entropy_weight: float = 0.0,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        if dim < 1 or codebook_size < 2:
            raise ConfigError(f"ibq: need dim >= 1 and codebook_size >= 2, got dim={dim}, "
                              f"codebook_size={codebook_size}")
        if temperature <= 0:
            raise ConfigError(f"ibq: temperature must be > 0, got {temperature}")
        if chunk_size < 1:
            raise ConfigError(f"ibq: chunk_size must be >= 1, got {chunk_size}")
        self.in_channels = self.out_channels = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.chunk_size = chunk_size
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size,
                                                                              1.0 / codebook_size))

    def forward(self, z: Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            rows, shape = to_rows(z.float())
            codebook = self.codebook.float()
            want_entropy = self.entropy_weight > 0
            needs_grad = torch.is_grad_enabled() and (rows.requires_grad or codebook.requires_grad)
            if needs_grad or want_entropy:
                q_st, idx, sample_h, batch_h = ibq_quantize(
                    rows, codebook, self.temperature, self.chunk_size, straight_through=True, entropy=want_entropy
                )
            else:  # inference: only the argmax is needed, one matmul per block
                idx = _ibq_forward(rows, codebook, self.temperature, self.chunk_size, False, False)["idx"]
                q_st = codebook[idx]
            q_hard = F.embedding(idx, codebook)
            losses = {
                "commitment": self.beta * F.mse_loss(rows, q_hard.detach()),
                "codebook": F.mse_loss(q_hard, rows.detach()) + F.mse_loss(q_st, rows.detach()),
            }
            if want_entropy:
                losses["entropy"] = self.entropy_weight * (sample_h - batch_h)
            indices = idx.reshape(shape)
            stats = codebook_stats(indices, self.codebook_size)
            return QuantizerOutput(quantized=from_rows(q_st, shape), indices=indices, losses=losses, stats=stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``(B, *S)`` ids -> ``(B, dim, *S)`` code vectors."""
        codes = F.embedding(indices.long(), self.codebook.float())
        return codes.movedim(-1, 1)
