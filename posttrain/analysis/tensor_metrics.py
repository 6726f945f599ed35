"""Spectral metrics of one (base, fine-tuned) weight pair, from their singular triplets.

`PairSpectra` holds what the metrics need in tall orientation (see `factors`): the two
factorisations, C = U_b^T dW V_b, the singular values of dW, and a way to form U_b[:, I]^T U_t[:, J]
(explicitly when both U exist, through the Gram matrices otherwise). `MatrixPair` wraps it (or,
in `--esd` mode, the two spectra alone) for the per-matrix diagnostics below, which
`posttrain.analysis.diagnostics` registers; left/right are named in the matrix's own orientation.
Definitions of every quantity are in `spectral`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from posttrain.analysis import spectral as sp
from posttrain.analysis.factors import Factors, gram, lapack_threads, top_singular_value

Tensor = torch.Tensor
NAN = float("nan")
DEG = 180.0 / math.pi


@dataclass
class PairSpectra:
    fb: Factors
    ft: Factors
    c_diag: Tensor  # diagonal of C = U_b^T dW V_b over the available base triplets
    c_sq: float  # ||C||_F^2 (complete factors; from_svd gives ||U_b^T dW||_F^2 for truncated ones, read by nothing)
    c_top: Callable[[int], Tensor]  # k -> C[:k, :k] = U_b[:, :k]^T dW V_b[:, :k]
    delta_sv: Tensor | None  # all singular values of dW (None: not computed)
    delta_top_sv: float  # ||dW||_2
    left_cross: Callable[[slice, slice], Tensor]  # (I, J) -> U_b[:, I]^T U_t[:, J]
    explicit_left: bool  # both U materialised


def from_svd(dW: Tensor, fb: Factors, ft: Factors) -> PairSpectra:
    """Pair view from explicit factorisations of tall W_b, W_t (dW = W_t - W_b, same orientation)."""
    assert fb.U is not None and ft.U is not None
    # C = X V_b with X = U_b^T dW; only diag(C), ||C||_F and the top-left block are needed, and with a
    # complete (square, orthogonal) V_b, ||C||_F = ||X||_F: one GEMM instead of two. Only the energy
    # split reads c_sq, and only for complete factors: a truncated V_b's ||X V_b||_F is never needed
    X = fb.U.mT @ dW
    c_diag = (X * fb.V.mT).sum(dim=-1)
    c_sq = float(X.double().pow(2).sum())
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
    inv = torch.zeros_like(s)
    if s.numel():
        keep = s > float(s.max()) * s.numel() * torch.finfo(s.dtype).eps
        inv[keep] = 1.0 / s[keep]
    return inv


class MatrixPair:
    """What a per-matrix diagnostic sees of one (base, fine-tuned) weight pair, in tall orientation.

    `fb`, `ft` are the two factorisations (`Factors`; singular values only in `--esd` mode, where
    `vectors` is False), `ps` the pair view of `from_svd` / `from_gram` (None without vectors), `k`
    the top/bottom subspace size, `q` the number of comparable triplets, `complete` whether both
    factorisations hold all min(m, n) triplets (False for a truncated randomised SVD), `delta_sq` =
    ||dW||_F^2 and `base_sq` = ||W_b||_F^2 from the streamed pass, and `side(i)` the name ("left" or
    "right", in the matrix's own orientation) of the tall U side (0) or V side (1). Derived
    quantities are computed once and shared between diagnostics: `angles(side, lo, hi)` (principal
    angles of the singular subspaces lo..hi), `curve` (the angle curve over `bins` spectrum ranges),
    `esd(tag)` (the ESD power-law fit of "base" or "ft"; the base's is shared across models through
    `base_cache`).
    """

    def __init__(self, fb: Factors, ft: Factors, k: int, *, bins: int, delta_sq: float, base_sq: float,
                 transposed: bool, ps: PairSpectra | None = None, base_cache: dict | None = None,
                 min_eval: float = 1e-5, name: str = "", null_seed: int | None = None) -> None:
        self.fb, self.ft, self.ps = fb, ft, ps
        self.name, self.null_seed = name, null_seed  # seed the norm-matched random update (`random_update_null`)
        self.q = min(fb.S.numel(), ft.S.numel())
        self.k = max(1, min(k, self.q))
        self.bins, self.delta_sq, self.base_sq, self.min_eval = bins, delta_sq, base_sq, min_eval
        self.sides = ("right", "left") if transposed else ("left", "right")  # names of the tall (U side, V side)
        self.complete = fb.complete and ft.complete
        self.base_cache = {} if base_cache is None else base_cache
        self._angles: dict[tuple[int, int, int], Tensor] = {}
        self._curve: list[dict] | None = None

    @property
    def vectors(self) -> bool:
        return self.ps is not None

    def side(self, i: int) -> str:
        return self.sides[i]

    @property
    def curve(self) -> list[dict]:
        """Mean principal angle (degrees) of each of `bins` spectrum ranges, per side: rows {side, bin,
        lo, hi, x, angle}; empty unless both factorisations are complete and have vectors."""
        if self._curve is None:
            self._curve = self._compute_curve() if self.vectors and self.complete else []
        return self._curve

    def _compute_curve(self) -> list[dict]:
        # the curve's first and last ranges are the top-k and bottom-k subspaces when k = q / bins
        # (the default), so they are computed once, batched, and found in the cache by `angles`
        fb, ft, ps, q = self.fb, self.ft, self.ps, self.q
        starts, w = sp.bin_starts(q, self.bins)
        curve = []
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
                self._angles[(side, s, s + w)] = th[b]
                curve.append({"side": self.sides[side], "bin": b, "lo": s, "hi": s + w, "x": (s + w / 2) / q,
                              "angle": means[b] * DEG})
        return curve

    def angles(self, side: int, lo: int, hi: int) -> Tensor:
        """Principal angles (radians, ascending) between the base's and the model's singular subspaces
        lo..hi-1 of the tall U side (0) or V side (1)."""
        self.curve  # noqa: B018 - fills the cache with the batched curve ranges first
        key = (side, lo, hi)
        if key not in self._angles:
            fb, ft, ps = self.fb, self.ft, self.ps
            idx = slice(lo, hi)
            if side == 1:
                self._angles[key] = sp.principal_angles(fb.V[:, idx], ft.V[:, idx])
            elif ps.explicit_left:
                self._angles[key] = sp.principal_angles(fb.U[:, idx], ft.U[:, idx])
            else:
                self._angles[key] = sp.angles_from_cosines(ps.left_cross(idx, idx))
        return self._angles[key]

    def esd(self, tag: str) -> sp.PowerLawFit:
        """The ESD power-law fit of the base ("base") or fine-tuned ("ft") matrix (complete spectra only)."""
        if tag == "base" and "esd" in self.base_cache:
            return self.base_cache["esd"]
        f = self.fb if tag == "base" else self.ft
        with lapack_threads(0):  # small element-wise work: threads only add synchronisation
            fit = sp.esd_powerlaw(f.S.double() ** 2, self.min_eval)
        if tag == "base":
            self.base_cache["esd"] = fit
        return fit


# ------------------------------------------------------------------------------------------------
# per-matrix diagnostics (registered in `posttrain.analysis.diagnostics`); each returns table columns


def top_subspace_angles(m: MatrixPair) -> dict[str, float]:
    """Per side of the top-k singular subspaces: mean and max principal angle (degrees), projection
    distance and alignment (definitions in `spectral`)."""
    out = {}
    for side in (0, 1):
        name = m.side(side)
        th = m.angles(side, 0, m.k)
        out[f"angle_top_{name}"] = float(th.mean()) * DEG
        out[f"angle_top_max_{name}"] = float(th.max()) * DEG
        out[f"proj_dist_top_{name}"] = sp.projection_distance(th)
        out[f"alignment_top_{name}"] = sp.subspace_alignment(th)
    return out


def bottom_subspace_angles(m: MatrixPair) -> dict[str, float]:
    """Mean principal angle (degrees) of the bottom-k singular subspaces, per side (complete spectra only)."""
    if not m.complete:
        return {}
    return {f"angle_bottom_{m.side(side)}": float(m.angles(side, m.q - m.k, m.q).mean()) * DEG for side in (0, 1)}


def singular_value_changes(m: MatrixPair) -> dict[str, float]:
    """Mean |s_t,i - s_b,i| / s_b,i over the top k, and (complete spectra) the bottom k and all i."""
    rel = sp.sv_relative_change(m.fb.S[:m.q], m.ft.S[:m.q]).abs()
    out = {"sv_rel_change_top": _mean(rel[:m.k])}
    if m.complete:
        out["sv_rel_change_bottom"] = _mean(rel[m.q - m.k:])
        out["sv_rel_change_all"] = _mean(rel)
    return out


NULL_DRAWS = 6  # random updates per matrix: their spread is the null's own noise


def null_seed_for(seed: int, name: str) -> int:
    """The generator seed of matrix `name`'s random updates: a function of the study seed and the
    tensor name only (crc32, not Python's salted hash), so it is the same in every run and process."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def random_update_null(m: MatrixPair) -> dict[str, float]:
    """The top-k principal angle and singular-value change of `NULL_DRAWS` norm-matched random
    updates: the null a rotation-vs-rescaling verdict is compared against (a random direction rotates
    the top singular subspaces and barely rescales the spectrum, so "angle > s.v. change" alone
    holds for noise).

        W_null,d = W_b + R_d * ||dW||_F / ||R_d||_F,   R_d,ij ~ N(0, 1) i.i.d., seeded by `null_seed_for`

    Per draw d: `null_angle_top_<side>_d<d>`, the mean principal angle (degrees) between the top-k
    singular subspaces of W_b and W_null,d, and `null_sv_rel_change_top_d<d>`, the mean
    |s_null,i - s_b,i| / s_b,i over the top k (the definitions of `top_subspace_angles` and
    `singular_value_changes`); without the suffix, their means over the draws. Needs the base's full
    SVD with both singular-vector sets (matrices analysed through their Gram matrix get none), a
    non-zero dW, and `m.null_seed` (None: the caller wants no null for this model).
    """
    fb = m.fb
    if m.null_seed is None or not (m.vectors and m.complete and fb.U is not None) or m.delta_sq <= 0:
        return {}
    Ub, Sb, Vb = fb.U.double(), fb.S.double(), fb.V.double()
    k = m.k
    # the whole null on one thread for small matrices: with other work on the machine, threads
    # spin-wait on each other in these small products and SVDs (see `lapack_threads`)
    with lapack_threads(Ub.shape[0] * Vb.shape[0]):
        Wb = (Ub * Sb) @ Vb.mT
        gen = torch.Generator().manual_seed(null_seed_for(m.null_seed, m.name))
        R = torch.randn((NULL_DRAWS, *Wb.shape), generator=gen, dtype=torch.float64).to(Wb.device)
        R *= math.sqrt(m.delta_sq) / torch.linalg.matrix_norm(R)[:, None, None]
        U, S, Vh = torch.linalg.svd(Wb + R, full_matrices=False)
        # the base's 2-D bases broadcast against the batch of draws
        left = sp.principal_angles(Ub[:, :k], U[..., :k].contiguous())
        right = sp.principal_angles(Vb[:, :k], Vh[:, :k].mT.contiguous())
    left, right = left.mean(-1) * DEG, right.mean(-1) * DEG
    svc = [_mean(sp.sv_relative_change(Sb[:k], S[d, :k]).abs()) for d in range(NULL_DRAWS)]
    out: dict[str, float] = {}
    for d in range(NULL_DRAWS):
        out[f"null_angle_top_{m.side(0)}_d{d}"] = float(left[d])
        out[f"null_angle_top_{m.side(1)}_d{d}"] = float(right[d])
        out[f"null_sv_rel_change_top_d{d}"] = svc[d]
    out[f"null_angle_top_{m.side(0)}"] = float(left.mean())
    out[f"null_angle_top_{m.side(1)}"] = float(right.mean())
    out["null_sv_rel_change_top"] = sum(svc) / NULL_DRAWS
    return out


def energy_split(m: MatrixPair) -> dict[str, float]:
    """Magnitude (diagonal) and rotation (off-diagonal) energy of C = U_b^T dW V_b (complete only):
    `energy_magnitude`, `energy_rotation` divided by ||dW||_F^2 as in the reference code
    (`spectral.energy_split`), and `energy_diag_in_span`, `energy_rotation_in_span` divided by
    ||C||_F^2, summing to 1 (`spectral.energy_split_in_span`)."""
    if not m.complete:
        return {}
    mag, rot = sp.energy_split(m.ps.c_diag, m.ps.c_sq, m.delta_sq)
    diag, rot_in = sp.energy_split_in_span(m.ps.c_diag, m.ps.c_sq)
    return {"energy_magnitude": mag, "energy_rotation": rot, "energy_diag_in_span": diag,
            "energy_rotation_in_span": rot_in}


def update_energy_top(m: MatrixPair) -> dict[str, float]:
    """Share of ||dW||_F^2 inside the base's top-k singular block: ||U_b,k^T dW V_b,k||_F^2 / ||dW||_F^2."""
    Ck = m.ps.c_top(m.k).double()
    return {"update_energy_top": float(Ck.pow(2).sum()) / m.delta_sq if m.delta_sq > 0 else NAN}


def update_ranks(m: MatrixPair) -> dict[str, float]:
    """Stable rank ||dW||_F^2 / ||dW||_2^2 and (when all singular values of dW are known) effective rank of dW."""
    ps = m.ps
    out = {"stable_rank_delta": m.delta_sq / ps.delta_top_sv**2 if ps.delta_top_sv > 0 else NAN}
    if ps.delta_sv is not None:
        out["effective_rank_delta"] = sp.effective_rank(ps.delta_sv)
    return out


def spectrum_summaries(m: MatrixPair) -> dict[str, float]:
    """WeightWatcher-style summaries of each matrix: log10 lambda_max ("log_spectral_norm", lambda =
    s^2), stable rank, and (complete spectra) ESD power-law alpha and alpha_weighted = alpha * log10
    lambda_max."""
    out: dict[str, float] = {}
    for tag, f in (("base", m.fb), ("ft", m.ft)):
        top = float(f.S[0]) if f.S.numel() else 0.0
        out[f"log_spectral_norm_{tag}"] = 2 * math.log10(top) if top > 0 else NAN
        if f.complete:
            out[f"stable_rank_{tag}"] = sp.stable_rank(f.S)
    if m.complete:
        for tag in ("base", "ft"):
            fit = m.esd(tag)
            out[f"alpha_{tag}"] = fit.alpha
            out[f"alpha_weighted_{tag}"] = fit.alpha * out[f"log_spectral_norm_{tag}"]
    return out


def _mean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else NAN
