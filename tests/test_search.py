"""Chunked nearest-code search against brute force (dense distance matrices)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vtok.quantizers.search import nearest_code


def brute_force(rows: torch.Tensor, codebook: torch.Tensor, distance: str) -> tuple[torch.Tensor, torch.Tensor]:
    if distance == "euclidean":
        d = torch.cdist(rows, codebook).square()
        return d.argmin(dim=1), d.min(dim=1).values
    if distance == "cosine":
        s = F.normalize(rows, dim=1) @ F.normalize(codebook, dim=1).T
    else:
        s = rows @ codebook.T
    return s.argmax(dim=1), s.max(dim=1).values


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100, 1000, 5000])
def test_matches_brute_force(distance: str, chunk_size: int) -> None:
    torch.manual_seed(chunk_size)
    rows, codebook = torch.randn(300, 16, dtype=torch.float64), torch.randn(1000, 16, dtype=torch.float64)
    idx, best = nearest_code(rows, codebook, distance, chunk_size)
    ref_idx, ref_best = brute_force(rows, codebook, distance)
    assert idx.dtype == torch.int64 and idx.shape == (300,)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(best, ref_best, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_row_chunking_gives_the_same_codes(distance: str) -> None:
    torch.manual_seed(0)
    rows, codebook = torch.randn(257, 8), torch.randn(333, 8)
    whole = nearest_code(rows, codebook, distance, chunk_size=50)
    for row_chunk in (1, 10, 256, 1000):
        parts = nearest_code(rows, codebook, distance, chunk_size=50, row_chunk_size=row_chunk)
        assert torch.equal(parts[0], whole[0])
        torch.testing.assert_close(parts[1], whole[1])  # BLAS may round differently per block shape


def test_float32_agrees_with_cdist() -> None:
    torch.manual_seed(1)
    rows, codebook = torch.randn(512, 32), torch.randn(4096, 32)
    idx, dist = nearest_code(rows, codebook, "euclidean", chunk_size=1000)
    assert torch.equal(idx, torch.cdist(rows, codebook).argmin(dim=1))
    torch.testing.assert_close(dist, (rows - codebook[idx]).square().sum(dim=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_ties_resolve_to_lowest_index(chunk_size: int) -> None:
    code = torch.tensor([[1.0, 2.0]])
    codebook = torch.cat([torch.tensor([[9.0, 9.0]]), code, code, code])  # codes 1, 2, 3 identical
    idx, _ = nearest_code(code.repeat(5, 1), codebook, "euclidean", chunk_size)
    assert idx.tolist() == [1] * 5


def test_no_autograd_and_empty_rows() -> None:
    rows = torch.randn(4, 3, requires_grad=True)
    codebook = torch.randn(6, 3, requires_grad=True)
    idx, best = nearest_code(rows, codebook)
    assert not best.requires_grad
    idx, best = nearest_code(rows[:0], codebook)
    assert idx.shape == (0,) and best.shape == (0,)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="distance"):
        nearest_code(torch.randn(2, 3), torch.randn(4, 3), "manhattan")
    with pytest.raises(ValueError, match="rows"):
        nearest_code(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_code(torch.randn(2, 3), torch.randn(4, 3), chunk_size=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 60),
    d=st.integers(1, 6),
    chunk=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    distance=st.sampled_from(["euclidean", "cosine", "dot"]),
)
def test_chosen_code_is_optimal(n: int, k: int, d: int, chunk: int, seed: int, distance: str) -> None:
    """Whatever the sizes and chunking, the chosen code scores as well as the best code (ties allowed)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=g, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=g, dtype=torch.float64)
    idx, best = nearest_code(rows, codebook, distance, chunk)
    assert ((idx >= 0) & (idx < k)).all()
    _, ref_best = brute_force(rows, codebook, distance)
    if distance == "euclidean":
        chosen = (rows - codebook[idx]).square().sum(dim=1)
    elif distance == "cosine":
        chosen = (F.normalize(rows, dim=1) * F.normalize(codebook[idx], dim=1)).sum(dim=1)
    else:
        chosen = (rows * codebook[idx]).sum(dim=1)
    torch.testing.assert_close(chosen, ref_best, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(best, ref_best, rtol=1e-9, atol=1e-9)
