"""Binary spherical quantization (BSQ; Zhao, Xiong & Krähenbühl 2024, arXiv:2406.07548).

The latent is projected (optionally) to ``K`` channels and l2-normalised onto the unit sphere; each channel
is then quantised to ``±1/sqrt(K)`` by its sign, so every code also lies on the sphere. Ids, sub-tokens and
the entropy penalty are LFQ's (:mod:`vtok.quantizers.lfq`) with code magnitude ``1/sqrt(K)``: the soft
assignment is ``softmax_c(-||u − c||² / T)``, i.e. per-bit ``p(+) = sigmoid(4 u_k / (sqrt(K) T))``.
Because ``u`` and every code have unit norm, the quantisation error is bounded, which is what lets BSQ
scale to many bits without a learned codebook.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from vtok.quantizers.lfq import BinaryQuantizer


class BSQ(BinaryQuantizer):
    """Binary spherical quantization (Zhao et al. 2024): ``u = z/||z||``, ``q = sign(u)/sqrt(K)``.

    ``K = codebook_dim or dim`` bits (linear projections ``dim -> K -> dim`` when they differ);
    ``codebook_size = 2^K``; id = bit pattern, channel 0 the most significant bit (as in LFQ). The quantized
    output is ``q`` on the unit sphere (then the output projection, if any).

    Losses (already weighted): ``commitment = commitment_weight · mse(u, sg(q))``; in training mode also
    ``entropy = entropy_weight · (mean per-sample entropy − diversity_weight · codebook entropy)``, exact over
    all ``2^K`` codes or ``entropy_mode="factorized"``. Stats ``sample_entropy``/``codebook_entropy`` are in
    nats. ``temperature=1.0`` matches the authors' release (``inv_temperature=1``); with unit-norm inputs
    that makes the soft assignment far less peaked than LFQ's default ``0.01`` on unnormalised latents.
    """

    type_name = "bsq"

    def __init__(
        self,
        dim: int,
        codebook_dim: int | None = None,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_weight: float = 1.0,
        temperature: float = 1.0,
        entropy_mode: str = "exact",
        sub_token_bits: list[int] | None = None,
        chunk_size: int = 2**18,
    ) -> None:
        super().__init__(dim, codebook_dim, entropy_weight, commitment_weight, diversity_weight, temperature,
                         entropy_mode, sub_token_bits, chunk_size)

    @property
    def code_scale(self) -> float:
        return 1.0 / math.sqrt(self.num_bits)

    def _latent(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)
