"""Singular triplets of one weight matrix, three ways, behind one small type.

Every matrix is handled in "tall" orientation (rows >= columns; a wide matrix is transposed first,
which swaps the roles of its left and right singular vectors and, with LAPACK's gesdd as torch
calls it, is also about 2x faster than decomposing the wide matrix). W = U diag(S) V^T with S
descending:

- `svd_factors(W)`: the full thin SVD (torch.linalg.svd); all r = n triplets.
- `svd_factors(W, rank=K)`: the top K triplets by randomised SVD (torch.svd_lowrank, Halko et al.
  2011) with oversampling and power iterations; `complete` is False.
- `gram_factors(G)`: S and V from the eigendecomposition of the n x n float64 Gram matrix
  G = W^T W, which accumulates block by block: for matrices too tall to decompose in memory
  (embeddings, LM heads) and, by default, for every elongated matrix that would otherwise get a
  float32 SVD (see `scan._use_gram`). U is not materialised; products with it go through G (see
  `tensor_metrics.from_gram`). Singular values come out with relative error ~ eps64 * (s_1/s_i)^2,
  singular vectors with ~ eps64 * s_1^2 / (s_i * gap_i): both better than a float32 SVD's
  eps32 * s_1 / s_i and eps32 * s_1 / gap_i for condition numbers up to ~1e8.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

Tensor = torch.Tensor

OVERSAMPLE = 10
POWER_ITERS = 4
SMALL_LAPACK = 2**18  # entries below which LAPACK calls run single-threaded


@contextlib.contextmanager
def lapack_threads(numel: int) -> Iterator[None]:
    """One CPU thread for small LAPACK problems. Threading gains nothing there, and when the machine
    is busy, MKL's OpenMP threads spin-wait for a descheduled peer: a 64 x 32 SVD measured 0.14 ms on
    one thread and 77 ms on two."""
    n = torch.get_num_threads()
    if numel >= SMALL_LAPACK or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Factors:
    S: Tensor  # (q,) descending
    V: Tensor | None  # (n, q); None when only singular values were computed
    U: Tensor | None  # (m, q); None when only the Gram matrix was formed
    complete: bool  # all min(m, n) triplets (False: only the top q)


def tall(W: Tensor) -> tuple[Tensor, bool]:
    """W itself when rows >= columns, else W^T; and whether it was transposed."""
    return (W.mT, True) if W.shape[-2] < W.shape[-1] else (W, False)


def svd_factors(W: Tensor, rank: int | None = None) -> Factors:
    """Full thin SVD of a tall W, or its top `rank` triplets by randomised SVD when `rank` is given."""
    if rank is None or rank >= W.shape[-1]:
        with lapack_threads(W.numel()):
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Factors(S, Vh.mT, U, True)
    q = min(W.shape[-1], rank + OVERSAMPLE)
    # svd_lowrank draws its test matrix from the global generator; a fixed seed keeps diffs reproducible
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []), lapack_threads(W.numel()):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(W, q=q, niter=POWER_ITERS)
    return Factors(S[:rank], V[:, :rank], U[:, :rank], False)


def singular_values(W: Tensor) -> Factors:
    """Singular values only (torch.linalg.svdvals), for the spectrum summaries."""
    with lapack_threads(W.numel()):
        return Factors(torch.linalg.svdvals(W), None, None, True)


def gram_values(G: Tensor) -> Factors:
    """Singular values only from G = W^T W (eigvalsh)."""
    with lapack_threads(G.numel()):
        return Factors(torch.linalg.eigvalsh(G).flip(-1).clamp(min=0).sqrt(), None, None, True)


def gram_factors(G: Tensor) -> Factors:
    """S = sqrt(eigenvalues of G = W^T W) and V = its eigenvectors, both in descending order."""
    with lapack_threads(G.numel()):
        lam, V = torch.linalg.eigh(G)
    return Factors(lam.flip(-1).clamp(min=0).sqrt(), V.flip(-1), None, True)


def gram(A: Tensor, blocks: int = 4) -> Tensor:
    """A^T A, computing only the blocks on and below the diagonal (10/16 of the flops with 4 blocks)
    and mirroring them; symmetric to the last bit, as eigh expects."""
    n = A.shape[-1]
    if n < 64 * blocks:
        G = A.mT @ A
        return (G + G.mT) / 2
    e = [round(i * n / blocks) for i in range(blocks + 1)]
    G = A.new_empty(n, n)
    for i in range(blocks):
        for j in range(i + 1):
            blk = A[:, e[i]:e[i + 1]].mT @ A[:, e[j]:e[j + 1]]
            if i == j:
                blk = (blk + blk.mT) / 2
            G[e[i]:e[i + 1], e[j]:e[j + 1]] = blk
            if i != j:
                G[e[j]:e[j + 1], e[i]:e[i + 1]] = blk.mT
    return G


def top_singular_value(W: Tensor) -> float:
    """Largest singular value (randomised with power iterations, accurate for the top one)."""
    if min(W.shape) <= 64:
        with lapack_threads(W.numel()):
            return float(torch.linalg.matrix_norm(W, ord=2))
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []), lapack_threads(W.numel()):
        torch.manual_seed(0)
        _, S, _ = torch.svd_lowrank(W, q=8, niter=POWER_ITERS)
    return float(S[0])
