"""Chunked nearest-code search shared by the codebook quantizers (VQ, residual VQ, IBQ).

Scoring every row against every code at once needs an ``N × K`` matrix: 2 GiB for 2048 rows and
``K = 2^18`` codes. :func:`nearest_code` instead walks over blocks of ``chunk_size`` codes (and, when ``N``
is large, blocks of rows), keeps a running best per row, and so never holds more than one
``row_block × chunk_size`` score block. Each code block is read (and, for cosine, normalised; for
Euclidean, its squared norms computed) exactly once per call, so no full copy of the codebook is made.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("euclidean", "cosine", "dot")

# Largest score block (in elements) held at once: 2^25 floats = 128 MiB, e.g. 2048 rows × 16384 codes.
MAX_BLOCK_ELEMENTS = 1 << 25
# Default block: 512 rows × 2048 codes (4 MiB of scores) stays in cache; measured on a 2-core EPYC it is
# 1.5× faster than 2048 × 16384 at d=256 (compute-bound) and 2.6× at d=8 (bandwidth-bound).
DEFAULT_CHUNK_SIZE = 2048
DEFAULT_ROW_CHUNK_SIZE = 512


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def nearest_code(
    rows: Tensor,
    codebook: Tensor,
    distance: str = "euclidean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    row_chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Best code for each row of ``rows (N, D)`` among ``codebook (K, D)``, without an ``N × K`` matrix.

    ``distance``:

    - ``"euclidean"``: argmin ``||z - e||²``, scored as ``||e||² - 2 z·e`` (``||z||²`` does not change the
      argmin and is added back only for the returned value, the squared distance).
    - ``"cosine"``: argmax of ``ẑ·ê`` with both sides l2-normalised; returns the cosine similarity.
    - ``"dot"``: argmax of ``z·e``; returns the dot product.

    ``chunk_size`` codes are scored per block; rows are processed ``row_chunk_size`` at a time (default:
    :data:`DEFAULT_ROW_CHUNK_SIZE`, fewer if a block would exceed :data:`MAX_BLOCK_ELEMENTS`). Ties resolve
    to the lowest index.
    Returns ``(indices int64 (N,), best score (N,))``. Runs without autograd: callers gather
    ``codebook[indices]`` themselves so the codebook gradient is a sparse scatter.
    """
    if distance not in DISTANCES:
        raise ValueError(f"nearest_code: distance must be one of {DISTANCES}, got {distance!r}")
    if rows.dim() != 2 or codebook.dim() != 2 or rows.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code: expected rows (N, D) and codebook (K, D), got {tuple(rows.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"nearest_code: chunk_size must be >= 1, got {chunk_size}")
    n, k = rows.shape[0], codebook.shape[0]
    if k == 0:
        raise ValueError("nearest_code: the codebook is empty")
    chunk_size = min(chunk_size, k)
    if row_chunk_size is None:
        row_chunk_size = max(1, min(DEFAULT_ROW_CHUNK_SIZE, MAX_BLOCK_ELEMENTS // chunk_size))
    minimise = distance == "euclidean"
    if distance == "cosine":
        rows = F.normalize(rows, dim=-1)

    best = rows.new_full((n,), float("inf") if minimise else float("-inf"))
    best_idx = torch.zeros(n, dtype=torch.long, device=rows.device)
    if n == 0:
        return best_idx, best
    for codes in _blocks(k, chunk_size):
        block = codebook[codes]
        if distance == "cosine":
            block = F.normalize(block, dim=-1)
        if minimise:
            sq_norms = block.pow(2).sum(dim=1)
        block_t = block.T
        for part in _blocks(n, row_chunk_size):
            zr = rows[part]
            if minimise:
                # ||e||² - 2 z·e in one fused call; the (chunk,) norms broadcast over the rows.
                scores = torch.addmm(sq_norms, zr, block_t, beta=1.0, alpha=-2.0)
                value, arg = scores.min(dim=1)
                better = value < best[part]
            else:
                scores = zr @ block_t
                value, arg = scores.max(dim=1)
                better = value > best[part]  # strict: an earlier block wins ties
            best[part] = torch.where(better, value, best[part])
            best_idx[part] = torch.where(better, arg + codes.start, best_idx[part])
    if minimise:
        best = (best + rows.pow(2).sum(dim=1)).clamp_min_(0.0)
    return best_idx, best
