"""Spectral comparison of weight matrices: pure functions on tensors, one formula each.

Notation. A base weight W_b and a fine-tuned W_t (m x n), the update dW = W_t - W_b, and thin SVDs
W = U diag(s) V^T with singular values s_1 >= s_2 >= ... >= s_r, r = min(m, n). "Top-k" means the
first k singular triplets, "bottom-k" the last k. Angles are in radians unless a name says degrees.

References
- Principal angles: Bjorck & Golub (1973), "Numerical methods for computing angles between linear
  subspaces"; the sine/cosine combination for small angles: Knyazev & Argentati (2002), "Principal
  angles between subspaces in an A-based scalar product", SIAM J. Sci. Comput. 23(6).
- Stable rank: Rudelson & Vershynin (2007). Effective rank: Roy & Vetterli (2007), "The effective
  rank: a measure of effective dimensionality", EUSIPCO.
- ESD power-law alpha: Clauset, Shalizi & Newman (2009), "Power-law distributions in empirical
  data" (continuous MLE, xmin by minimum Kolmogorov-Smirnov distance), as used by WeightWatcher:
  Martin & Mahoney (2021), "Implicit self-regularization in deep neural networks", JMLR 22.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from posttrain.analysis.factors import lapack_threads

Tensor = torch.Tensor


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles between span(A) and span(B), ascending, in radians.

    A (m x k) and B (m x l) have orthonormal columns (or are batches of such, ... x m x k); with
    M = A^T B:

        theta_i = arccos sigma_i(M),          i = 1 .. min(k, l)   (Bjorck & Golub 1973)

    arccos is ill-conditioned near 1 (an error eps in the cosine gives ~sqrt(2 eps) in the angle), so
    when k == l the angles below pi/4 are taken from their sines instead (Knyazev & Argentati 2002):

        sin theta_i = sigma_{k+1-i}(R),   R = B - A M = (I - A A^T) B,

    with sigma(R)^2 computed as the eigenvalues of the k x k matrix R^T R, which avoids an m x k SVD;
    the absolute error of each angle is then about sqrt(eps) * sin(theta_max) (1e-9 rad in float64
    next to a 0.5 rad angle), far below the arccos error it replaces.
    """
    M = A.mT @ B
    with lapack_threads(M.numel()):
        cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # descending, so the angles come out ascending
    theta = torch.arccos(cos)
    if A.shape[-1] == B.shape[-1]:
        R = B - A @ M
        G = R.mT @ R
        with lapack_threads(G.numel()):
            sin = torch.linalg.eigvalsh(G).clamp(min=0.0).sqrt().clamp(max=1.0)  # ascending
        theta = torch.where(cos * cos >= 0.5, torch.arcsin(sin), theta)
    return theta


def angles_from_cosines(M: Tensor) -> Tensor:
    """Principal angles from the cross-Gram M = A^T B alone: theta_i = arccos sigma_i(M), ascending.

    Used when the bases themselves are not materialised (huge matrices analysed through their Gram
    matrices); accurate to about sqrt(2 eps) for angles near zero, exact in exact arithmetic.
    """
    with lapack_threads(M.numel()):
        return torch.arccos(torch.linalg.svdvals(M).clamp(0.0, 1.0))


def projection_distance(theta: Tensor) -> float:
    """Projection (chordal) distance of two k-dimensional subspaces from their principal angles:

        ||A A^T - B B^T||_F = sqrt(k + k - 2 ||A^T B||_F^2) = sqrt(2 * sum_i sin^2 theta_i)

    0 for equal subspaces, sqrt(2k) for orthogonal ones.
    """
    return float(torch.sqrt(2.0 * torch.sin(theta.double()).pow(2).sum()))


def subspace_alignment(theta: Tensor) -> float:
    """Alignment (overlap) of two k-dimensional subspaces: ||A^T B||_F^2 / k = mean_i cos^2 theta_i.

    1 for equal subspaces, 0 for orthogonal ones; two random k-dim subspaces of R^m give about k/m.
    """
    return float(torch.cos(theta.double()).pow(2).mean())


def energy_split(C_diag: Tensor, C_sq: float, dW_sq: float) -> tuple[float, float]:
    """The reference's magnitude / rotation energies of an update dW in the base's singular basis,
    C = U_b^T dW V_b (RL_Heals_SFT, analysis/raw_metrics_angle.py, `projection_energy`):

        magnitude = sum_i C_ii^2 / ||dW||_F^2,     rotation = (||C||_F^2 - sum_i C_ii^2) / ||dW||_F^2

    given the diagonal of C, ||C||_F^2 and ||dW||_F^2 (C itself need not be formed). In the base's
    singular basis, C_ii = u_i^T dW v_i changes singular value i without turning its vectors (to
    first order), while C_ij (i != j) mixes triplets i and j, i.e. rotates the singular vectors. The
    two need not sum to 1: for a non-square m x n matrix (or a truncated basis) the part of dW
    outside span(U_b) x span(V_b), 1 - magnitude - rotation, belongs to neither. Returns (nan, nan)
    when dW = 0 (the reference adds 1e-12 to the denominator instead).
    """
    if not dW_sq > 0:
        return float("nan"), float("nan")
    d = float(C_diag.double().pow(2).sum())
    return d / dW_sq, max(C_sq - d, 0.0) / dW_sq  # rounding can make a pure scaling's C_sq - d negative


def energy_split_in_span(C_diag: Tensor, C_sq: float) -> tuple[float, float]:
    """Diagonal and off-diagonal shares of the in-span energy ||C||_F^2 for C = U_b^T dW V_b:

        diag = sum_i C_ii^2 / ||C||_F^2,     rotation = 1 - diag

    (they sum to 1). Equal to `energy_split` when U_b, V_b are both square (a square matrix, all
    triplets); on a non-square matrix each is larger by ||dW||_F^2 / ||C||_F^2. Returns (nan, nan)
    when C = 0.
    """
    if not C_sq > 0:
        return float("nan"), float("nan")
    d = min(1.0, float(C_diag.double().pow(2).sum()) / C_sq)  # rounding can push a pure scaling past 1
    return d, 1.0 - d


def stable_rank(s: Tensor) -> float:
    """Stable rank from singular values: ||A||_F^2 / ||A||_2^2 = sum_i s_i^2 / s_1^2 (nan for A = 0)."""
    s = s.double()
    top = float(s.max()) if s.numel() else 0.0
    return float(s.pow(2).sum()) / top**2 if top > 0 else float("nan")


def effective_rank(s: Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / sum_j s_j, H(p) = -sum_i p_i log p_i.

    Between 1 (rank one) and r (all singular values equal); nan for a zero matrix.
    """
    s = s.double().clamp(min=0.0)
    total = float(s.sum())
    if total <= 0:
        return float("nan")
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def sv_relative_change(s_base: Tensor, s_ft: Tensor) -> Tensor:
    """Signed relative change of each singular value, (s_t,i - s_b,i) / s_b,i (nan where s_b,i = 0).

    Singular values are matched by rank (i-th largest with i-th largest), which is how a spectrum
    "before/after" is read; a value that moves past a neighbour is compared with that neighbour.
    """
    s_base, s_ft = s_base.double(), s_ft.double()
    out = (s_ft - s_base) / s_base
    return torch.where(s_base > 0, out, torch.full_like(out, float("nan")))


def bin_starts(r: int, bins: int) -> tuple[list[int], int]:
    """`min(bins, r)` equal-width index ranges [start, start + width) spread evenly over 0..r, the
    first at the top (0) and the last ending at the bottom (r); neighbours overlap by at most one
    index when r is not a multiple of the count. Returns (starts, width)."""
    b = max(1, min(bins, r))
    w = -(-r // b)  # ceil: neighbours may overlap, never leave an index out
    if b == 1:
        return [0], r
    return [round(i * (r - w) / (b - 1)) for i in range(b)], w


def top_k(r: int, frac: float) -> int:
    """Size of the top/bottom subspaces: k = ceil(frac * r), at least 1 and at most r."""
    return max(1, min(r, math.ceil(frac * r - 1e-9)))


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit p(x) ~ x^-alpha of an eigenvalue tail x >= xmin; `D` is the KS distance."""

    alpha: float
    xmin: float
    D: float
    n_tail: int


NAN_FIT = PowerLawFit(float("nan"), float("nan"), float("nan"), 0)


def esd_powerlaw(evals: Tensor | np.ndarray, min_eval: float = 1e-5, min_n: int = 10) -> PowerLawFit:
    """Power-law exponent of an empirical spectral density (ESD), WeightWatcher's default fit.

    `evals` are the eigenvalues of W^T W (squared singular values). Those <= `min_eval` are dropped
    (WeightWatcher's EVALS_THRESH); with the rest sorted, x_1 <= ... <= x_N, each candidate
    xmin = x_i (i < N) gets the continuous maximum-likelihood exponent over its tail of n = N - i + 1
    points (Clauset et al. 2009, eq. 3.1)

        alpha_i = 1 + n / sum_{j >= i} ln(x_j / x_i)

    and the Kolmogorov-Smirnov distance between the tail's empirical CDF and the fitted one,

        D_i = max_{j >= i} | (j - i) / n - (1 - (x_j / x_i)^(1 - alpha_i)) |     (D_i = 1 if alpha_i <= 1)

    The fit is the candidate with the smallest D. alpha is scale-invariant, so normalising W (e.g.
    by 1/sqrt(N)) does not change it. Fewer than `min_n` eigenvalues give a nan fit (WeightWatcher
    switches to a small-sample variant below 20; we keep one estimator).
    """
    x = torch.as_tensor(evals).detach().to("cpu", torch.float64).flatten()
    x = torch.sort(x[torch.isfinite(x) & (x > min_eval)]).values
    N = int(x.numel())
    if N < max(2, min_n):
        return NAN_FIT
    logx = x.log()
    # suffix sums give every candidate's MLE at once
    suffix = logx.flip(0).cumsum(0).flip(0)
    n = (N - torch.arange(N - 1)).double()
    denom = suffix[:-1] - n * logx[:-1]
    alphas = torch.where(denom > 0, 1.0 + n / denom, torch.full_like(denom, float("nan")))
    Ds = torch.ones(N - 1, dtype=torch.float64)
    cand = torch.nonzero(torch.isfinite(alphas) & (alphas > 1)).flatten()
    if cand.numel() == 0:
        return NAN_FIT
    # Branch and bound, so a full ESD costs far less than the N^2 / 2 CDF evaluations of the plain scan
    # while selecting exactly the same xmin: every tail point is a valid evaluation point, so a strided
    # subset of them gives a lower bound on each candidate's D, and only candidates whose bound beats
    # the best exact D found so far need their full tail.
    stride = max(1, N // 64)
    lower = _ks_distance(logx, alphas, cand, N, stride)
    order = cand[torch.argsort(lower, stable=True)]
    lower = torch.sort(lower, stable=True).values
    best_d, best_i, pos, batch = math.inf, -1, 0, 32
    while pos < order.numel() and float(lower[pos]) <= best_d:
        idx = order[pos:pos + batch]
        d = _ks_distance(logx, alphas, idx, N, 1)
        Ds[idx] = d
        for i, di in zip(idx.tolist(), d.tolist()):
            if di < best_d or (di == best_d and i < best_i):
                best_d, best_i = di, i
        pos += batch
    a = float(alphas[best_i])
    return PowerLawFit(a, float(x[best_i]), best_d, int(N - best_i))


def _ks_distance(logx: Tensor, alphas: Tensor, idx: Tensor, N: int, stride: int) -> Tensor:
    """max over the tail points j = i, i + stride, ... (and N - 1) of |(j - i)/(N - i) - F_i(x_j)| for
    each candidate i in `idx`, with F_i(x) = 1 - (x / x_i)^(1 - alpha_i); stride 1 is the exact KS D."""
    out = []
    steps = torch.cat([torch.arange(0, N, stride), torch.tensor([N])])
    block = max(1, 2_000_000 // steps.numel())
    for s in range(0, idx.numel(), block):
        i = idx[s:s + block]
        J = (i[:, None] + steps[None, :]).clamp_(max=N - 1)  # past the end = the last point, still in the tail
        n = (N - i).double()[:, None]
        fit = torch.expm1((logx[J] - logx[i][:, None]) * (1.0 - alphas[i][:, None]))  # = -F_i(x_j)
        out.append(((J - i[:, None]) / n + fit).abs_().amax(dim=1))
    return torch.cat(out)
