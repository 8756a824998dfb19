"""Tiny ``torch.distributed`` helpers that are no-ops in a single process.

Quantizers that update state outside autograd (EMA codebooks, k-means init, dead-code restarts) call these
so every rank applies the same update; without an initialised process group they do nothing.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside distributed runs)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside distributed runs)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place; returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s copy, in place; returns ``t``."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t
