"""One row of spectral metrics for a (base, fine-tuned) pair, against the definitions computed here
from full SVDs, through both routes (explicit factors and Gram matrices) and both orientations. The
row is what `scan` writes: every per-matrix column of the diagnostics table (NaN where a diagnostic
has nothing to say), filled by the table's per-matrix functions of one `MatrixPair`."""

import math
import zlib

import pytest
import torch

from posttrain.analysis import spectral as sp
from posttrain.analysis.factors import Factors, gram_factors, svd_factors
from posttrain.analysis.diagnostics import matrix_columns, matrix_diagnostics
from posttrain.analysis.tensor_metrics import (
    DEG,
    NAN,
    NULL_DRAWS,
    MatrixPair,
    _safe_inv,
    bottom_subspace_angles,
    from_gram,
    from_svd,
    null_seed_for,
    random_update_null,
    spectrum_summaries,
    top_subspace_angles,
    update_energy_top,
    update_ranks,
)

M, N, K, BINS = 30, 20, 3, 4

# the spectral part of a tensor row, as the table declares it (a diagnostic dropped from the table
# or a renamed column fails here)
SPECTRAL_COLUMNS = [
    "k", "angle_top_left", "angle_top_right", "angle_top_max_left", "angle_top_max_right", "proj_dist_top_left",
    "proj_dist_top_right", "alignment_top_left", "alignment_top_right", "angle_bottom_left", "angle_bottom_right",
    "sv_rel_change_top", "sv_rel_change_bottom", "sv_rel_change_all", "null_angle_top_left", "null_angle_top_right",
    "null_sv_rel_change_top", *(f"null_{c}_d{d}" for d in range(6) for c in ("angle_top_left", "angle_top_right",
                                                                        "sv_rel_change_top")),
    "energy_magnitude", "energy_rotation", "energy_diag_in_span", "energy_rotation_in_span", "update_energy_top", "stable_rank_delta", "effective_rank_delta", "stable_rank_base", "stable_rank_ft",
    "alpha_base", "alpha_ft", "alpha_weighted_base", "alpha_weighted_ft", "log_spectral_norm_base",
    "log_spectral_norm_ft",
]


def test_the_table_declares_the_spectral_columns():
    assert matrix_columns() == SPECTRAL_COLUMNS
    values_only = {c for d in matrix_diagnostics(vectors=False) for c in d.columns}
    assert values_only == {"sv_rel_change_top", "sv_rel_change_bottom", "sv_rel_change_all", "stable_rank_base",
                           "stable_rank_ft", "alpha_base", "alpha_ft", "alpha_weighted_base", "alpha_weighted_ft",
                           "log_spectral_norm_base", "log_spectral_norm_ft"}
    assert {c for d in matrix_diagnostics(vectors=True) for c in d.columns} == set(SPECTRAL_COLUMNS) - {"k"}


def pair_metrics(ps, k, bins, dsq, transposed):
    """(row, curve) of one pair as `scan` computes them: every per-matrix diagnostic of the table."""
    m = MatrixPair(ps.fb, ps.ft, k, bins=bins, delta_sq=dsq, base_sq=1.0, transposed=transposed, ps=ps,
                   name="w", null_seed=0)
    row = dict.fromkeys(matrix_columns(), NAN)
    row["k"] = m.k
    for d in matrix_diagnostics(vectors=True):
        row.update(d.compute(m))
    return row, m.curve, m


def spectrum_metrics(fb, ft, k):
    """The singular-value-only columns (`--esd` mode: no vectors) that the table's diagnostics give."""
    m = MatrixPair(fb, ft, k, bins=BINS, delta_sq=1.0, base_sq=1.0, transposed=False)
    assert not m.vectors and m.curve == []
    row = {}
    for d in matrix_diagnostics(vectors=False):
        row.update(d.compute(m))
    return row


def orthonormal(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


@pytest.fixture(scope="module")
def pair():
    """Tall base 30 x 20 with a spread spectrum; the fine-tuned matrix turns left vector 0 out of
    span(U_b), left vectors 4 and 10 into each other (across the curve's bins 0 and 2) and right
    vector 19, and rescales singular values 1 (x1.5) and 18 (x0.5)."""
    U, V = orthonormal(M, N + 1, 1), orthonormal(N, N, 2)
    s = torch.logspace(1, -1, N, dtype=torch.float64)
    Wb = U[:, :N] @ torch.diag(s) @ V.T
    Ut, Vt, st = U[:, :N].clone(), V.clone(), s.clone()
    Ut[:, 0] = math.cos(0.3) * U[:, 0] + math.sin(0.3) * U[:, N]  # out of span(U_b)
    # within span(U_b) but out of each bin's own range: a curve that compares a bin with more than
    # its own range on either side sees no angle there
    Ut[:, 4], Ut[:, 10] = math.cos(0.25) * U[:, 4] + math.sin(0.25) * U[:, 10], \
        -math.sin(0.25) * U[:, 4] + math.cos(0.25) * U[:, 10]
    c, sn = math.cos(0.2), math.sin(0.2)
    Vt[:, 19], Vt[:, 10] = c * V[:, 19] + sn * V[:, 10], -sn * V[:, 19] + c * V[:, 10]
    st[1] *= 1.5
    st[18] *= 0.5
    Wt = Ut @ torch.diag(st) @ Vt.T
    return Wb, Wt


def reference(Wb, Wt, k=K):
    Ub, sb, Vbh = torch.linalg.svd(Wb, full_matrices=False)
    Ut, st, Vth = torch.linalg.svd(Wt, full_matrices=False)
    Vb, Vt = Vbh.T, Vth.T
    dW = Wt - Wb
    q = sb.numel()
    out = {"k": k}
    for side, (A, B) in (("left", (Ub, Ut)), ("right", (Vb, Vt))):
        top = sp.principal_angles(A[:, :k], B[:, :k])
        out[f"angle_top_{side}"] = float(top.mean()) * DEG
        out[f"angle_top_max_{side}"] = float(top.max()) * DEG
        out[f"proj_dist_top_{side}"] = sp.projection_distance(top)
        out[f"alignment_top_{side}"] = sp.subspace_alignment(top)
        out[f"angle_bottom_{side}"] = float(sp.principal_angles(A[:, q - k:], B[:, q - k:]).mean()) * DEG
    rel = ((st - sb) / sb).abs()
    out["sv_rel_change_top"] = float(rel[:k].mean())
    out["sv_rel_change_bottom"] = float(rel[q - k:].mean())
    out["sv_rel_change_all"] = float(rel.mean())
    C = Ub.T @ dW @ Vb
    dsq = float((dW ** 2).sum())
    diag, csq = float((C.diagonal() ** 2).sum()), float((C ** 2).sum())
    # the reference's split divides by ||dW||^2; on this tall matrix part of dW lies outside
    # span(U_b) x span(V_b), so the two do not sum to 1; the in-span shares divide by ||C||^2
    out["energy_magnitude"] = diag / dsq
    out["energy_rotation"] = (csq - diag) / dsq
    out["energy_diag_in_span"] = diag / csq
    out["energy_rotation_in_span"] = 1 - diag / csq
    out["update_energy_top"] = float((C[:k, :k] ** 2).sum()) / dsq
    ds = torch.linalg.svdvals(dW)
    out["stable_rank_delta"] = dsq / float(ds[0]) ** 2
    out["effective_rank_delta"] = sp.effective_rank(ds)
    for tag, s in (("base", sb), ("ft", st)):
        out[f"stable_rank_{tag}"] = sp.stable_rank(s)
        out[f"log_spectral_norm_{tag}"] = 2 * math.log10(float(s[0]))
        fit = sp.esd_powerlaw(s ** 2)
        out[f"alpha_{tag}"] = fit.alpha
        out[f"alpha_weighted_{tag}"] = fit.alpha * out[f"log_spectral_norm_{tag}"]
    return out, dsq


def check_row(row, ref, swap=False, rel=1e-6, abs=1e-9, null=True):
    flip = {"left": "right", "right": "left"}
    assert set(row) == set(SPECTRAL_COLUMNS)
    for key, value in ref.items():
        name = key
        if swap:
            for a, b in flip.items():
                if key.endswith(a):
                    name = key[: -len(a)] + b
        assert row[name] == pytest.approx(value, rel=rel, abs=abs), key
    # without U (the Gram route) there is no base matrix to add a random update to: no null
    nan = {k for k, v in row.items() if k in SPECTRAL_COLUMNS and isinstance(v, float) and math.isnan(v)}
    assert nan == (set() if null else {c for c in SPECTRAL_COLUMNS if c.startswith("null_")})


def test_explicit_factors_give_the_definitions(pair):
    Wb, Wt = pair
    ref, dsq = reference(Wb, Wt)
    fb, ft = svd_factors(Wb), svd_factors(Wt)
    row, curve, m = pair_metrics(from_svd(Wt - Wb, fb, ft), K, BINS, dsq, transposed=False)
    check_row(row, ref)
    # the base's ESD fit is kept for the other models of the same tensor
    assert m.base_cache["esd"].alpha == pytest.approx(ref["alpha_base"])
    # the planted rotation: left vector 0 turned by 0.3 rad, right vector 19 by 0.2 rad
    assert row["angle_top_max_left"] == pytest.approx(0.3 * DEG, rel=1e-6)
    assert row["angle_bottom_right"] == pytest.approx(0.2 * DEG / K, rel=1e-6)
    # the curve: BINS ranges of width 5 per side, x at the range's centre
    starts, w = sp.bin_starts(N, BINS)
    assert (starts, w) == ([0, 5, 10, 15], 5)
    assert [(c["side"], c["bin"], c["lo"], c["hi"]) for c in curve] == \
        [(side, b, s, s + 5) for side in ("left", "right") for b, s in enumerate(starts)]
    assert [c["x"] for c in curve[:4]] == [2.5 / 20, 7.5 / 20, 12.5 / 20, 17.5 / 20]
    Ub, _, Vbh = torch.linalg.svd(Wb, full_matrices=False)
    Ut, _, Vth = torch.linalg.svd(Wt, full_matrices=False)
    for c in curve:
        A, B = (Ub, Ut) if c["side"] == "left" else (Vbh.T, Vth.T)
        expect = float(sp.principal_angles(A[:, c["lo"]:c["hi"]], B[:, c["lo"]:c["hi"]]).mean()) * DEG
        assert c["angle"] == pytest.approx(expect, rel=1e-6, abs=1e-9)


def test_gram_route_gives_the_same_row(pair):
    Wb, Wt = pair
    ref, dsq = reference(Wb, Wt)
    dW = Wt - Wb
    fb, ft = gram_factors(Wb.T @ Wb), gram_factors(Wt.T @ Wt)
    ps = from_gram(Wb.T @ Wb, Wb.T @ dW, dW.T @ dW, fb, ft)
    assert ps.explicit_left is False
    row, curve, _ = pair_metrics(ps, K, BINS, dsq, transposed=False)
    # angles from cosines alone are accurate to ~sqrt(eps): 1e-5 degrees near zero
    check_row(row, ref, rel=1e-5, abs=1e-4, null=False)
    explicit, curve_svd, _ = pair_metrics(from_svd(dW, svd_factors(Wb), svd_factors(Wt)), K, BINS, dsq, False)
    assert [c["angle"] for c in curve] == pytest.approx([c["angle"] for c in curve_svd], rel=1e-5, abs=1e-4)
    # the turn of left vectors 4 and 10 shows in bins 0 and 2 of the left side (mean over 5 angles)
    assert [c["angle"] for c in curve[:4]] == pytest.approx([(0.3 + 0.25) * DEG / 5, 0, 0.25 * DEG / 5, 0], abs=1e-4)


def test_a_wide_matrix_names_its_sides_in_its_own_orientation(pair):
    Wb, Wt = pair
    ref, dsq = reference(Wb, Wt)
    # the tall view of a wide matrix W (20 x 30) is W^T: its tall left side is W's right side
    row, curve, _ = pair_metrics(from_svd(Wt - Wb, svd_factors(Wb), svd_factors(Wt)), K, BINS, dsq, transposed=True)
    check_row(row, ref, swap=True)
    assert {c["side"] for c in curve[:4]} == {"right"} and {c["side"] for c in curve[4:]} == {"left"}


def test_random_update_null_by_hand(pair):
    """The null: NULL_DRAWS Gaussian updates, each scaled to ||dW||_F, seeded by the seed and the name."""
    Wb, Wt = pair
    dsq = float(((Wt - Wb) ** 2).sum())
    row, _, _ = pair_metrics(from_svd(Wt - Wb, svd_factors(Wb), svd_factors(Wt)), K, BINS, dsq, False)
    g = torch.Generator().manual_seed(null_seed_for(0, "w"))
    R = torch.randn((NULL_DRAWS, *Wb.shape), generator=g, dtype=torch.float64)
    Ub, sb, Vbh = torch.linalg.svd(Wb, full_matrices=False)
    lefts, rights, svcs = [], [], []
    for d in range(NULL_DRAWS):
        Rd = R[d] * math.sqrt(dsq) / float(R[d].norm())
        assert float(Rd.norm()) ** 2 == pytest.approx(dsq)
        Un, sn, Vnh = torch.linalg.svd(Wb + Rd, full_matrices=False)
        lefts.append(float(sp.principal_angles(Ub[:, :K], Un[:, :K]).mean()) * DEG)
        rights.append(float(sp.principal_angles(Vbh[:K].T, Vnh[:K].T).mean()) * DEG)
        svcs.append(float(((sn[:K] - sb[:K]) / sb[:K]).abs().mean()))
        assert row[f"null_angle_top_left_d{d}"] == pytest.approx(lefts[-1], rel=1e-6)
        assert row[f"null_angle_top_right_d{d}"] == pytest.approx(rights[-1], rel=1e-6)
        assert row[f"null_sv_rel_change_top_d{d}"] == pytest.approx(svcs[-1], rel=1e-6)
    assert row["null_angle_top_left"] == pytest.approx(sum(lefts) / NULL_DRAWS, rel=1e-9)
    assert row["null_sv_rel_change_top"] == pytest.approx(sum(svcs) / NULL_DRAWS, rel=1e-9)
    assert len(set(svcs)) == NULL_DRAWS  # independent draws, not one draw repeated
    # another name (or study seed) draws another update; no seed: no null
    assert null_seed_for(0, "w") != null_seed_for(0, "v") != null_seed_for(1, "w")
    m = MatrixPair(svd_factors(Wb), svd_factors(Wt), K, bins=BINS, delta_sq=dsq, base_sq=1.0, transposed=False,
                   ps=from_svd(Wt - Wb, svd_factors(Wb), svd_factors(Wt)))
    assert random_update_null(m) == {}


def test_k_is_clamped_and_partial_factors_skip_what_they_cannot_give(pair):
    Wb, Wt = pair
    dsq = float(((Wt - Wb) ** 2).sum())
    row, _, _ = pair_metrics(from_svd(Wt - Wb, svd_factors(Wb), svd_factors(Wt)), 99, BINS, dsq, False)
    assert row["k"] == N
    row, _, _ = pair_metrics(from_svd(Wt - Wb, svd_factors(Wb), svd_factors(Wt)), 0, BINS, dsq, False)
    assert row["k"] == 1
    # top-4 factors only (randomised SVD): no bottom angles, energy split, curve or ESD fit
    fb, ft = svd_factors(Wb, rank=4), svd_factors(Wt, rank=4)
    assert not fb.complete
    row, curve, _ = pair_metrics(from_svd(Wt - Wb, fb, ft), K, BINS, dsq, False)
    ref, _ = reference(Wb, Wt)
    assert curve == []
    for key in ("angle_bottom_left", "energy_magnitude", "energy_rotation_in_span", "sv_rel_change_bottom", "alpha_base",
                "effective_rank_delta", "stable_rank_base"):
        assert math.isnan(row[key]), key
    for key in ("angle_top_left", "angle_top_right", "sv_rel_change_top", "log_spectral_norm_ft", "stable_rank_delta"):
        assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-8), key


def test_spectrum_metrics_by_hand():
    fb = Factors(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64), None, None, True)
    ft = Factors(torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64), None, None, True)
    row = spectrum_metrics(fb, ft, 1)
    assert row["sv_rel_change_top"] == pytest.approx(0.25)
    assert row["sv_rel_change_bottom"] == pytest.approx(0.5)
    assert row["sv_rel_change_all"] == pytest.approx(0.75 / 3)
    assert row["log_spectral_norm_base"] == pytest.approx(2 * math.log10(4.0))
    assert row["log_spectral_norm_ft"] == pytest.approx(2 * math.log10(5.0))
    assert row["stable_rank_base"] == pytest.approx(21 / 16) and row["stable_rank_ft"] == pytest.approx(29.25 / 25)
    assert math.isnan(row["alpha_base"])  # three eigenvalues are too few for a power-law fit
    # k is clamped to the spectrum; a partial factorisation has no bottom or all
    assert spectrum_metrics(fb, ft, 10)["sv_rel_change_top"] == pytest.approx(0.75 / 3)
    part = spectrum_metrics(Factors(fb.S, None, None, False), ft, 2)
    assert part["sv_rel_change_top"] == pytest.approx(0.25 / 2) and "sv_rel_change_bottom" not in part
    assert "stable_rank_base" not in part and "stable_rank_ft" in part
    zero = spectrum_metrics(Factors(torch.zeros(2, dtype=torch.float64), None, None, True), ft, 1)
    assert math.isnan(zero["log_spectral_norm_base"]) and math.isnan(zero["sv_rel_change_top"])


def test_safe_inv_leaves_out_directions_at_or_below_the_rank_tolerance():
    # tol = s_max * len(s) * eps; directions at or below it get 0, the rest 1/s
    assert _safe_inv(torch.zeros(0, dtype=torch.float64)).shape == (0,)
    assert _safe_inv(torch.zeros(3, dtype=torch.float64)).tolist() == [0.0, 0.0, 0.0]
    assert _safe_inv(torch.tensor([4.0, 2.0], dtype=torch.float64)).tolist() == [0.25, 0.5]
    # exactly at the tolerance: 1 * 2 * 2^-52 = 2^-51
    assert _safe_inv(torch.tensor([1.0, 2.0**-51], dtype=torch.float64)).tolist() == [1.0, 0.0]
    # below 3 * eps = 6.7e-16 (but above eps / 3): left out
    assert _safe_inv(torch.tensor([1.0, 0.5, 4e-16], dtype=torch.float64)).tolist() == [1.0, 2.0, 0.0]
    assert _safe_inv(torch.tensor([1.0, 0.5, 8e-16], dtype=torch.float64)).tolist() == [1.0, 2.0, 1 / 8e-16]


def test_the_curve_ranges_serve_the_top_and_bottom_angles(pair):
    """With k = q / bins the top-k and bottom-k subspaces are the curve's first and last ranges: they
    are found in the cache the curve filled, not decomposed again under another key."""
    Wb, Wt = pair
    dsq = float(((Wt - Wb) ** 2).sum())
    m = MatrixPair(svd_factors(Wb), svd_factors(Wt), N // BINS, bins=BINS, delta_sq=dsq, base_sq=1.0,
                   transposed=False, ps=from_svd(Wt - Wb, svd_factors(Wb), svd_factors(Wt)))
    top, bottom = top_subspace_angles(m), bottom_subspace_angles(m)
    assert set(m._angles) == {(side, s, s + 5) for side in (0, 1) for s in (0, 5, 10, 15)}
    Ub, _, Vbh = torch.linalg.svd(Wb, full_matrices=False)
    Ut, _, Vth = torch.linalg.svd(Wt, full_matrices=False)
    assert top["angle_top_left"] == pytest.approx((0.3 + 0.25) * DEG / 5, rel=1e-6)
    assert top["angle_top_right"] == pytest.approx(float(sp.principal_angles(Vbh[:5].T, Vth[:5].T).mean()) * DEG,
                                                   rel=1e-6, abs=1e-9)
    assert bottom["angle_bottom_right"] == pytest.approx(0.2 * DEG / 5, rel=1e-6)
    assert bottom["angle_bottom_left"] == pytest.approx(0.0, abs=1e-6)


def _delta_pair(dW, Wb):
    return from_svd(dW, svd_factors(Wb), svd_factors(Wb + dW))


def test_delta_singular_values_route_by_dtype_and_width():
    """dW's singular values: svdvals for float64 or at most 64 columns, else the eigenvalues of its
    float64 Gram matrix (which come out in float64)."""
    g = torch.Generator().manual_seed(3)
    for n, dt, route in ((64, torch.float32, "svd"), (65, torch.float32, "gram"), (65, torch.float64, "svd")):
        Wb = torch.randn(80, n, generator=g, dtype=dt)
        s = torch.logspace(0, -10, n, dtype=torch.float64)  # down to 1e-10: lost in a Gram matrix
        dW = (orthonormal(80, n, 4) * s @ orthonormal(n, n, 5).T).to(dt)
        ps = _delta_pair(dW, Wb)
        if route == "svd":
            assert ps.delta_sv.dtype == dt and torch.equal(ps.delta_sv, torch.linalg.svdvals(dW))
        else:
            assert ps.delta_sv.dtype == torch.float64
            assert ps.delta_sv[:8] == pytest.approx(torch.linalg.svdvals(dW.double())[:8], rel=1e-4)
        if dt == torch.float64:
            assert ps.delta_sv.tolist() == pytest.approx(s.tolist(), rel=1e-4)
        assert ps.delta_top_sv == pytest.approx(1.0, rel=1e-5)


def test_empty_matrices_give_empty_spectra_and_no_logs():
    # a matrix with no columns: no singular values, ||dW||_2 = 0, no spectral norm to take the log of
    e = torch.zeros(5, 0, dtype=torch.float64)
    ps = _delta_pair(e, e)
    assert ps.delta_sv.numel() == 0 and ps.delta_top_sv == 0.0
    fe = gram_factors(torch.zeros(0, 0, dtype=torch.float64))
    g0 = torch.zeros(0, 0, dtype=torch.float64)
    ps = from_gram(g0, g0, g0, fe, fe)
    assert ps.delta_sv.numel() == 0 and ps.delta_top_sv == 0.0 and ps.c_sq == 0.0
    empty = Factors(torch.zeros(0, dtype=torch.float64), None, None, False)
    row = spectrum_summaries(MatrixPair(empty, empty, 1, bins=BINS, delta_sq=0.0, base_sq=0.0, transposed=False))
    assert math.isnan(row["log_spectral_norm_base"]) and math.isnan(row["log_spectral_norm_ft"])


def test_a_small_rank_one_update_by_hand():
    """W_b = diag(3, 2, 1) over a zero row, dW = 0.5 e_1 e_1^T: ||dW||_F^2 = 0.25 = ||dW||_2^2, all of it
    in the base's top singular pair (norms below 1 must not read as "no update")."""
    Wb = torch.zeros(4, 3, dtype=torch.float64)
    Wb[0, 0], Wb[1, 1], Wb[2, 2] = 3.0, 2.0, 1.0
    dW = torch.zeros_like(Wb)
    dW[0, 0] = 0.5
    for k in (1, 2):
        m = MatrixPair(svd_factors(Wb), svd_factors(Wb + dW), k, bins=1, delta_sq=0.25, base_sq=14.0,
                       transposed=False, ps=_delta_pair(dW, Wb))
        assert update_energy_top(m)["update_energy_top"] == pytest.approx(1.0)
        ranks = update_ranks(m)
        assert ranks["stable_rank_delta"] == pytest.approx(1.0)
        assert ranks["effective_rank_delta"] == pytest.approx(1.0)
    # spectral norm below 1: a negative log, not NaN
    half = Factors(torch.tensor([0.5, 0.25], dtype=torch.float64), None, None, True)
    row = spectrum_summaries(MatrixPair(half, half, 1, bins=1, delta_sq=0.0, base_sq=0.3125, transposed=False))
    assert row["log_spectral_norm_base"] == pytest.approx(2 * math.log10(0.5))


def test_null_seed_formula_by_hand():
    crc = zlib.crc32(b"w")
    assert null_seed_for(0, "w") == crc
    assert null_seed_for(3, "w") == 3 * 1_000_003 + crc
    # reduced mod 2^63: 2^62 times an odd number is 2^62 there
    assert null_seed_for(2**62, "w") == 2**62 + crc


def test_random_update_null_needs_a_nonzero_update_and_names_default_to_empty(pair):
    Wb, Wt = pair
    fb, ft = svd_factors(Wb), svd_factors(Wt)
    ps = from_svd(Wt - Wb, fb, ft)

    def null(**kw):
        return random_update_null(MatrixPair(fb, ft, K, bins=BINS, base_sq=1.0, transposed=False, ps=ps, **kw))

    assert null(delta_sq=0.0, null_seed=0) == {}
    unnamed = null(delta_sq=1.0, null_seed=0)
    assert unnamed == null(delta_sq=1.0, null_seed=0, name="")
    assert unnamed != null(delta_sq=1.0, null_seed=0, name="w")


def test_esd_reads_and_fills_the_shared_base_cache_and_uses_min_eval():
    s = torch.logspace(1, -1, N, dtype=torch.float64)  # eigenvalues 100 .. 0.01, 10 of them above 1
    f = Factors(s, None, None, True)
    cached = object()
    m = MatrixPair(f, f, K, bins=BINS, delta_sq=1.0, base_sq=1.0, transposed=False, base_cache={"esd": cached})
    assert m.esd("base") is cached and m.esd("ft") is not cached
    shared: dict = {}
    m = MatrixPair(f, f, K, bins=BINS, delta_sq=1.0, base_sq=1.0, transposed=False, base_cache=shared,
                   min_eval=1.0)
    fit = m.esd("base")
    assert shared["esd"] is fit
    assert fit.alpha == pytest.approx(sp.esd_powerlaw(s**2, 1.0).alpha)
    assert fit.n_tail <= 10 and fit.alpha != pytest.approx(sp.esd_powerlaw(s**2).alpha)


def test_from_svd_needs_both_left_bases_and_crosses_them(pair):
    Wb, Wt = pair
    fb, ft = svd_factors(Wb), svd_factors(Wt)
    with pytest.raises(AssertionError):
        from_svd(Wt - Wb, fb, Factors(ft.S, ft.V, None, True))
    ps = from_svd(Wt - Wb, fb, ft)
    assert torch.equal(ps.left_cross(slice(0, 3), slice(1, 4)), fb.U[:, :3].T @ ft.U[:, 1:4])
