"""Spectral metrics of one (base, fine-tuned) weight pair, from their singular triplets.

`PairSpectra` holds what the metrics need in tall orientation (see `factors`): the two
factorisations, C = U_b^T dW V_b, the singular values of dW, and a way to form U_b[:, I]^T U_t[:, J]
(explicitly when both U exist, through the Gram matrices otherwise). `pair_metrics` turns it into
one table row (left/right named in the matrix's own orientation) and the angle curve over the
spectrum. Definitions of every quantity are in `spectral`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from posttrain.analysis import spectral as sp
from posttrain.analysis.factors import Factors, gram, lapack_threads, top_singular_value

Tensor = torch.Tensor
NAN = float("nan")
DEG = 180.0 / math.pi

# the per-tensor spectral columns, in table order (all floats; nan where not computed)
SPECTRAL_COLUMNS = [
    "k", "angle_top_left", "angle_top_right", "angle_top_max_left", "angle_top_max_right",
    "angle_bottom_left", "angle_bottom_right", "proj_dist_top_left", "proj_dist_top_right",
    "alignment_top_left", "alignment_top_right", "sv_rel_change_top", "sv_rel_change_bottom",
    "sv_rel_change_all", "energy_diag", "energy_rotation", "update_energy_top",
    "stable_rank_delta", "effective_rank_delta", "stable_rank_base", "stable_rank_ft",
    "alpha_base", "alpha_ft", "alpha_weighted_base", "alpha_weighted_ft",
    "log_spectral_norm_base", "log_spectral_norm_ft",
]


@dataclass
class PairSpectra:
    fb: Factors
    ft: Factors
    c_diag: Tensor  # diagonal of C = U_b^T dW V_b over the available base triplets
    c_sq: float  # ||C||_F^2
    c_top: Callable[[int], Tensor]  # k -> C[:k, :k] = U_b[:, :k]^T dW V_b[:, :k]
    delta_sv: Tensor | None  # all singular values of dW (None: not computed)
    delta_top_sv: float  # ||dW||_2
    left_cross: Callable[[slice, slice], Tensor]  # (I, J) -> U_b[:, I]^T U_t[:, J]
    explicit_left: bool  # both U materialised


def from_svd(dW: Tensor, fb: Factors, ft: Factors) -> PairSpectra:
    """Pair view from explicit factorisations of tall W_b, W_t (dW = W_t - W_b, same orientation)."""
    assert fb.U is not None and ft.U is not None
    # C = X V_b with X = U_b^T dW; only diag(C), ||C||_F and the top-left block are needed, and with a
    # complete (square, orthogonal) V_b, ||C||_F = ||X||_F: one GEMM instead of two
    X = fb.U.mT @ dW
    c_diag = (X * fb.V.mT).sum(dim=-1)
    c_sq = float(X.double().pow(2).sum()) if fb.complete else float((X @ fb.V).double().pow(2).sum())
    if fb.complete:
        # float64 (small matrices): exact singular values. float32: eigenvalues of the float64 Gram
        # matrix cost a fraction of an SVD, and float64 keeps the noise floor (~sqrt(eps) * s_1) from
        # inflating the effective rank of a low-rank dW.
        if dW.dtype == torch.float64 or dW.shape[-1] <= 64:
            with lapack_threads(dW.numel()):
                dsv = torch.linalg.svdvals(dW)
        else:
            G = gram(dW.double())
            with lapack_threads(G.numel()):
                dsv = torch.linalg.eigvalsh(G).flip(-1).clamp(min=0).sqrt()
        dtop = float(dsv[0]) if dsv.numel() else 0.0
    else:
        dsv, dtop = None, top_singular_value(dW)
    Ub, Ut, Vb = fb.U, ft.U, fb.V
    return PairSpectra(fb, ft, c_diag, c_sq, lambda k: X[:k] @ Vb[:, :k], dsv, dtop,
                       lambda I, J: Ub[:, I].mT @ Ut[:, J], True)


def from_gram(Gbb: Tensor, Gbd: Tensor, Gdd: Tensor, fb: Factors, ft: Factors) -> PairSpectra:
    """Pair view of tall matrices from G_bb = W_b^T W_b, G_bd = W_b^T dW, G_dd = dW^T dW.

    With U = W V S^-1 (for s > 0) and Z = V_b^T G_bd:
        C = U_b^T dW V_b = S_b^-1 Z V_b,   so  ||C||_F^2 = sum_i ||Z_i||^2 / s_b,i^2  (V_b orthogonal);
        U_b^T U_t = S_b^-1 V_b^T (G_bb + G_bd) V_t S_t^-1 = S_b^-1 (S_b^2 V_b^T + Z) V_t S_t^-1,
    using V_b^T G_bb = S_b^2 V_b^T: one n x n x n product serves every metric.
    """
    inv_b = _safe_inv(fb.S)
    inv_t = _safe_inv(ft.S)
    Z = fb.V.mT @ Gbd
    c_diag = inv_b * (Z * fb.V.mT).sum(dim=-1)
    c_sq = float((inv_b.pow(2) * Z.pow(2).sum(dim=-1)).sum())
    Y = fb.S.pow(2)[:, None] * fb.V.mT + Z  # V_b^T G_bt
    with lapack_threads(Gdd.numel()):
        dsv = torch.linalg.eigvalsh(Gdd).flip(-1).clamp(min=0).sqrt()

    def cross(I: slice, J: slice) -> Tensor:
        return inv_b[I, None] * (Y[I] @ ft.V[:, J]) * inv_t[None, J]

    def c_top(k: int) -> Tensor:
        return inv_b[:k, None] * (Z[:k] @ fb.V[:, :k])

    return PairSpectra(fb, ft, c_diag, c_sq, c_top, dsv, float(dsv[0]) if dsv.numel() else 0.0, cross, False)


def _safe_inv(s: Tensor) -> Tensor:
    # directions with s ~ 0 have no defined left vector; leave them out rather than divide by ~0
    tol = float(s.max()) * max(s.shape[-1], 1) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    return torch.where(s > tol, 1.0 / s.clamp(min=tol if tol > 0 else 1e-300), torch.zeros_like(s))


def pair_metrics(ps: PairSpectra, k: int, bins: int, delta_sq: float, transposed: bool,
                 esd_base=None, min_eval: float = 1e-5) -> tuple[dict, list[dict]]:
    """One row of spectral metrics and the angle curve rows for a pair in tall orientation.

    `k` is the top/bottom subspace size, `bins` the number of spectrum ranges of the angle curve,
    `delta_sq` = ||dW||_F^2 (computed exactly while streaming), `transposed` whether tall = W^T (then
    the tall left side is the matrix's right side). `esd_base` reuses the base's ESD fit across
    models. Angles are reported in degrees.
    """
    fb, ft = ps.fb, ps.ft
    q = min(fb.S.numel(), ft.S.numel())
    k = max(1, min(k, q))
    sides = ("right", "left") if transposed else ("left", "right")  # names of the tall (U side, V side)
    row: dict = {c: NAN for c in SPECTRAL_COLUMNS}
    row["k"] = k
    cache: dict[tuple[str, int, int], Tensor] = {}

    def angles(side: int, lo: int, hi: int) -> Tensor:
        key = (sides[side], lo, hi)
        if key not in cache:
            I = slice(lo, hi)
            if side == 1:
                cache[key] = sp.principal_angles(fb.V[:, I], ft.V[:, I])
            elif ps.explicit_left:
                cache[key] = sp.principal_angles(fb.U[:, I], ft.U[:, I])
            else:
                cache[key] = sp.angles_from_cosines(ps.left_cross(I, I))
        return cache[key]

    complete = fb.complete and ft.complete
    curve = []
    if complete:
        # the curve's first and last ranges are the top-k and bottom-k subspaces when k = q / bins
        # (the default), so they are computed once, batched, and found in the cache below
        starts, w = sp.bin_starts(q, bins)
        for side in (0, 1):
            if side == 1 or ps.explicit_left:
                Mb, Mt = (fb.V, ft.V) if side == 1 else (fb.U, ft.U)
                # rows of M^T are contiguous for LAPACK's column-major output: cheap to stack
                th = sp.principal_angles(torch.stack([Mb.mT[s:s + w] for s in starts]).mT,
                                         torch.stack([Mt.mT[s:s + w] for s in starts]).mT)
            else:
                th = torch.stack([sp.angles_from_cosines(ps.left_cross(slice(s, s + w), slice(s, s + w)))
                                  for s in starts])
            means = th.mean(dim=-1).tolist()
            for b, s in enumerate(starts):
                cache[(sides[side], s, s + w)] = th[b]
                curve.append({"side": sides[side], "bin": b, "lo": s, "hi": s + w, "x": (s + w / 2) / q,
                              "angle": means[b] * DEG})

    for side in (0, 1):
        name = sides[side]
        th = angles(side, 0, k)
        row[f"angle_top_{name}"] = float(th.mean()) * DEG
        row[f"angle_top_max_{name}"] = float(th.max()) * DEG
        row[f"proj_dist_top_{name}"] = sp.projection_distance(th)
        row[f"alignment_top_{name}"] = sp.subspace_alignment(th)
    row.update(spectrum_metrics(fb, ft, k, esd_base, min_eval))
    if complete:
        for side in (0, 1):
            row[f"angle_bottom_{sides[side]}"] = float(angles(side, q - k, q).mean()) * DEG
        row["energy_diag"], row["energy_rotation"] = sp.energy_split(ps.c_diag, ps.c_sq)
    Ck = ps.c_top(k).double()
    row["update_energy_top"] = float(Ck.pow(2).sum()) / delta_sq if delta_sq > 0 else NAN
    row["stable_rank_delta"] = delta_sq / ps.delta_top_sv**2 if ps.delta_top_sv > 0 else NAN
    if ps.delta_sv is not None:
        row["effective_rank_delta"] = sp.effective_rank(ps.delta_sv)
    return row, curve


def spectrum_metrics(fb: Factors, ft: Factors, k: int, esd_base: sp.PowerLawFit | None = None,
                     min_eval: float = 1e-5) -> dict:
    """What the two spectra alone tell (no singular vectors needed): relative singular-value changes
    (mean |s_t,i - s_b,i| / s_b,i over the top k, the bottom k and all), and per matrix the
    WeightWatcher-style summaries stable rank, log10 lambda_max ("log_spectral_norm", lambda = s^2),
    ESD power-law alpha and alpha_weighted = alpha * log10 lambda_max. The base's fit is returned
    under "_esd_base" for reuse across models."""
    q = min(fb.S.numel(), ft.S.numel())
    k = max(1, min(k, q))
    row: dict = {}
    rel = sp.sv_relative_change(fb.S[:q], ft.S[:q]).abs()
    row["sv_rel_change_top"] = _mean(rel[:k])
    complete = fb.complete and ft.complete
    if complete:
        row["sv_rel_change_bottom"] = _mean(rel[q - k:])
        row["sv_rel_change_all"] = _mean(rel)
    for tag, f in (("base", fb), ("ft", ft)):
        top = float(f.S[0]) if f.S.numel() else 0.0
        row[f"log_spectral_norm_{tag}"] = 2 * math.log10(top) if top > 0 else NAN
        if f.complete:
            row[f"stable_rank_{tag}"] = sp.stable_rank(f.S)
    if complete:
        with lapack_threads(0):  # small element-wise work: threads only add synchronisation
            fits = {"base": esd_base if esd_base is not None else sp.esd_powerlaw(fb.S.double() ** 2, min_eval),
                    "ft": sp.esd_powerlaw(ft.S.double() ** 2, min_eval)}
        for tag, fit in fits.items():
            row[f"alpha_{tag}"] = fit.alpha
            row[f"alpha_weighted_{tag}"] = fit.alpha * row[f"log_spectral_norm_{tag}"]
        row["_esd_base"] = fits["base"]
    return row


def _mean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else NAN
