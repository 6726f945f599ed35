"""Singular triplets of one weight matrix, three ways, behind one small type.

Every matrix is handled in "tall" orientation (rows >= columns; a wide matrix is transposed first,
which swaps the roles of its left and right singular vectors and, with LAPACK's gesdd as torch
calls it, is also about 3x faster than decomposing the wide matrix). W = U diag(S) V^T with S
descending:

- `svd_factors(W)`: the full thin SVD (torch.linalg.svd); all r = n triplets.
- `svd_factors(W, rank=K)`: the top K triplets by randomised SVD (torch.svd_lowrank, Halko et al.
  2011) with oversampling and power iterations; `complete` is False.
- `gram_factors(G)`: S and V from the eigendecomposition of the n x n Gram matrix G = W^T W, for
  matrices too tall to decompose in memory (embeddings, LM heads). U is not materialised; products
  with it go through G (see `tensor_metrics`). Small singular values lose relative accuracy as
  eps * (s_1 / s_i)^2 with eps the float64 epsilon, i.e. they are exact for all practical purposes
  up to condition numbers ~1e5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

OVERSAMPLE = 10
POWER_ITERS = 4


@dataclass
class Factors:
    S: Tensor  # (q,) descending
    V: Tensor  # (n, q)
    U: Tensor | None  # (m, q); None when only the Gram matrix was formed
    complete: bool  # all min(m, n) triplets (False: only the top q)


def tall(W: Tensor) -> tuple[Tensor, bool]:
    """W itself when rows >= columns, else W^T; and whether it was transposed."""
    return (W.mT, True) if W.shape[-2] < W.shape[-1] else (W, False)


def svd_factors(W: Tensor, rank: int | None = None) -> Factors:
    """Full thin SVD of a tall W, or its top `rank` triplets by randomised SVD when `rank` is given."""
    if rank is None or rank >= W.shape[-1]:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Factors(S, Vh.mT, U, True)
    q = min(W.shape[-1], rank + OVERSAMPLE)
    # svd_lowrank draws its test matrix from the global generator; a fixed seed keeps diffs reproducible
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(W, q=q, niter=POWER_ITERS)
    return Factors(S[:rank], V[:, :rank], U[:, :rank], False)


def gram_factors(G: Tensor) -> Factors:
    """S = sqrt(eigenvalues of G = W^T W) and V = its eigenvectors, both in descending order."""
    lam, V = torch.linalg.eigh(G)
    return Factors(lam.flip(-1).clamp(min=0).sqrt(), V.flip(-1), None, True)


def top_singular_value(W: Tensor) -> float:
    """Largest singular value (randomised with power iterations, accurate for the top one)."""
    if min(W.shape) <= 64:
        return float(torch.linalg.matrix_norm(W, ord=2))
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
        torch.manual_seed(0)
        _, S, _ = torch.svd_lowrank(W, q=8, niter=POWER_ITERS)
    return float(S[0])
