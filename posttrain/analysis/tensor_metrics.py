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
from posttrain.analysis.factors import Factors, top_singular_value

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
    C: Tensor  # U_b^T dW V_b over the available base triplets
    delta_sv: Tensor | None  # all singular values of dW (None: not computed)
    delta_top_sv: float  # ||dW||_2
    left_cross: Callable[[slice, slice], Tensor]  # (I, J) -> U_b[:, I]^T U_t[:, J]
    explicit_left: bool  # both U materialised


def from_svd(dW: Tensor, fb: Factors, ft: Factors) -> PairSpectra:
    """Pair view from explicit factorisations of tall W_b, W_t (dW = W_t - W_b, same orientation)."""
    assert fb.U is not None and ft.U is not None
    C = (fb.U.mT @ dW) @ fb.V
    if fb.complete:
        # float64 (small matrices): exact singular values. float32: the Gram route costs a fraction
        # of an SVD; its noise floor (~sqrt(eps32) * s_1) only matters for dW of exact low rank.
        if dW.dtype == torch.float64 or dW.shape[-1] <= 64:
            dsv = torch.linalg.svdvals(dW)
        else:
            dsv = torch.linalg.eigvalsh(dW.mT @ dW).flip(-1).clamp(min=0).sqrt()
        dtop = float(dsv[0]) if dsv.numel() else 0.0
    else:
        dsv, dtop = None, top_singular_value(dW)
    Ub, Ut = fb.U, ft.U
    return PairSpectra(fb, ft, C, dsv, dtop, lambda I, J: Ub[:, I].mT @ Ut[:, J], True)


def from_gram(Gbb: Tensor, Gbd: Tensor, Gdd: Tensor, fb: Factors, ft: Factors) -> PairSpectra:
    """Pair view of huge tall matrices from G_bb = W_b^T W_b, G_bd = W_b^T dW, G_dd = dW^T dW.

    With U = W V S^-1 (for s > 0):  U_b^T U_t = S_b^-1 V_b^T (G_bb + G_bd) V_t S_t^-1  and
    C = U_b^T dW V_b = S_b^-1 V_b^T G_bd V_b.
    """
    inv_b = _safe_inv(fb.S)
    inv_t = _safe_inv(ft.S)
    Gbt = Gbb + Gbd
    C = inv_b[:, None] * (fb.V.mT @ Gbd @ fb.V)
    dsv = torch.linalg.eigvalsh(Gdd).flip(-1).clamp(min=0).sqrt()

    def cross(I: slice, J: slice) -> Tensor:
        return inv_b[I, None] * (fb.V[:, I].mT @ Gbt @ ft.V[:, J]) * inv_t[None, J]

    return PairSpectra(fb, ft, C, dsv, float(dsv[0]) if dsv.numel() else 0.0, cross, False)


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

    for side in (0, 1):
        name = sides[side]
        th = angles(side, 0, k)
        row[f"angle_top_{name}"] = float(th.mean()) * DEG
        row[f"angle_top_max_{name}"] = float(th.max()) * DEG
        row[f"proj_dist_top_{name}"] = sp.projection_distance(th)
        row[f"alignment_top_{name}"] = sp.subspace_alignment(th)
    rel = sp.sv_relative_change(fb.S[:q], ft.S[:q]).abs()
    row["sv_rel_change_top"] = _mean(rel[:k])
    complete = fb.complete and ft.complete
    if complete:
        for side in (0, 1):
            row[f"angle_bottom_{sides[side]}"] = float(angles(side, q - k, q).mean()) * DEG
        row["sv_rel_change_bottom"] = _mean(rel[q - k:])
        row["sv_rel_change_all"] = _mean(rel)
        row["energy_diag"], row["energy_rotation"] = sp.energy_split(ps.C)
    Ck = ps.C[:k, :k].double()
    row["update_energy_top"] = float(Ck.pow(2).sum()) / delta_sq if delta_sq > 0 else NAN
    row["stable_rank_delta"] = delta_sq / ps.delta_top_sv**2 if ps.delta_top_sv > 0 else NAN
    if ps.delta_sv is not None:
        row["effective_rank_delta"] = sp.effective_rank(ps.delta_sv)
    for tag, f in (("base", fb), ("ft", ft)):
        top = float(f.S[0]) if f.S.numel() else 0.0
        row[f"log_spectral_norm_{tag}"] = 2 * math.log10(top) if top > 0 else NAN
        if f.complete:
            row[f"stable_rank_{tag}"] = sp.stable_rank(f.S)
    if complete:
        fits = {"base": esd_base if esd_base is not None else sp.esd_powerlaw(fb.S.double() ** 2, min_eval),
                "ft": sp.esd_powerlaw(ft.S.double() ** 2, min_eval)}
        for tag, fit in fits.items():
            row[f"alpha_{tag}"] = fit.alpha
            row[f"alpha_weighted_{tag}"] = fit.alpha * row[f"log_spectral_norm_{tag}"]
        row["_esd_base"] = fits["base"]

    curve = []
    if complete:
        edges = sp.bin_edges(q, bins)
        for side in (0, 1):
            for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                curve.append({"side": sides[side], "bin": b, "lo": lo, "hi": hi, "x": (lo + hi) / 2 / q,
                              "angle": float(angles(side, lo, hi).mean()) * DEG})
    return row, curve


def _mean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else NAN
