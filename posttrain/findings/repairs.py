"""Can SFT's damage be repaired cheaply? Claims of the spectral-repair literature, checked on the
study's recovery sweep (arXiv 2508.16546, 2509.12235).

Each claim is decided on the published operator (UV-merge without re-orthonormalisation, layer
reset in the reference's scope); our variant's number, when the sweep has it, is shown beside it in
the evidence. A recovered fraction exists only when SFT lost OOD accuracy beyond noise (see
`posttrain.repair.sweep`); otherwise the claim cannot be tested in this run.
"""

from __future__ import annotations

import math

from posttrain.evaluation.noise import binomial_se
from posttrain.findings import Context, Measured, finding

THRESHOLD = 0.7
FRACTION_RULE = ("recovered fraction = (ood(repaired) - ood(SFT)) / (ood(reference) - ood(SFT)), compared with "
                 "0.7 using its delta-method standard error; not testable unless SFT lost OOD accuracy by more than "
                 "twice the gap's binomial standard error")
UV_REFERENCE = {"mode": "direction", "top": 0.2, "bottom": 0.0, "orthonormalize": False}


def repair_pick(repairs: dict, method: str, source: str = "base", **params) -> tuple[str, dict] | None:
    """The first repair of the sweep made by `method` from `source` (repair.source) with these parameter values."""
    for name, r in repairs.items():
        if r["method"] == method and r.get("source", "base") == source and all(r["params"].get(k) == v for k, v in params.items()):
            return name, r
    return None


def recovered(r: dict) -> str:
    f = r.get("ood_recovered_frac")
    return "n/a" if f is None else f"{100 * f:.0f}%"


def untestable_gap(r: dict) -> str:
    """Why a repair has no recovered fraction: the lost OOD gap and twice its standard error."""
    gap, se = r.get("ood_gap"), r.get("ood_gap_se")
    if gap is None:
        return "cannot test: the sweep recorded no OOD gap"
    noise = "" if se is None else f", 2 SE = {2 * se:.3f}"
    why = "SFT did not lose OOD accuracy" if gap <= 0 else "the lost OOD accuracy is within noise"
    return f"cannot test: {why} (gap to recover {gap:+.3f}{noise})"


def _recovers(ctx: Context, method: str, params: dict, variant: tuple[str, dict] | None = None):
    hit = repair_pick(ctx.repairs, method, **params)
    if hit is None:
        wanted = ", ".join(f"{k}={v}" for k, v in params.items())
        return None, f"no {method} repair with {wanted} in this run's sweep"
    name, r = hit
    f, kept = r.get("ood_recovered_frac"), r.get("id_kept_frac")
    kept_s = "n/a" if kept is None else f"{100 * kept:.0f}%"
    gap = "n/a" if r.get("ood_gap") is None else f"{r['ood_gap']:+.3f}"  # results written before the noise rule
    ev = (f"{name}: OOD {r['ood_acc']:.3f} (gap to recover {gap}), recovered {recovered(r)}"
          + ("" if r.get("ood_recovered_se") is None else f" ± {100 * r['ood_recovered_se']:.0f}% (SE)")
          + f", in-domain gain kept {kept_s}")
    if variant is not None and (other := repair_pick(ctx.repairs, method, **variant[1])) is not None:
        ev += f"; {variant[0]} ({other[0]}): recovered {recovered(other[1])}"
    if f is None:
        return None, f"{untestable_gap(r)}; {ev}"
    return Measured(f, THRESHOLD, r.get("ood_recovered_se"), ev)


@finding("uv_top20_recovers_ood",
         "Restoring the base's top-20% singular directions recovers >= 70% of SFT's lost OOD accuracy (rule: UV-merge "
         "in direction mode at top 20% with the published operator, no re-orthonormalisation; " + FRACTION_RULE
         + "; the QR variant's number is shown beside it).", paper="arXiv 2508.16546", noisy=True)
def uv_top20_recovers_ood(ctx: Context):
    return _recovers(ctx, "uv_merge", UV_REFERENCE, ("QR variant", {**UV_REFERENCE, "orthonormalize": True}))


@finding("reset_first_quarter_recovers_ood",
         "Resetting the first 25% of layers to the base recovers >= 70% of SFT's lost OOD accuracy (rule: reset in "
         "the reference's scope, the layers' matrices + token embeddings + LM head, norms kept; " + FRACTION_RULE
         + "; the whole-layer reset's number is shown beside it).", paper="arXiv 2508.16546", noisy=True)
def reset_first_quarter_recovers_ood(ctx: Context):
    return _recovers(ctx, "reset_layers", {"first_frac": 0.25, "scope": "reference"},
                     ("whole layers, norms included", {"first_frac": 0.25, "scope": "layers"}))


@finding("sft_damage_is_rotation",
         "SFT's damage is a rotation of singular vectors, not a change of singular values: restoring all base "
         "directions recovers more OOD accuracy than restoring all base singular values (rule: UV-merge at top 100% "
         "in direction mode, U_b diag(s_t) V_b^T, against magnitude mode, U_t diag(s_b) V_t^T; the published "
         "operator's shortcut at full rank returns the base matrix itself, singular values included, so the "
         "direction side is the re-orthonormalised operator, which equals the published formula without that "
         "shortcut; the difference of the recovered fractions must exceed twice its delta-method SE).",
         paper="arXiv 2508.16546", noisy=True)
def sft_damage_is_rotation(ctx: Context):
    d = repair_pick(ctx.repairs, "uv_merge", mode="direction", top=1.0, orthonormalize=True)
    m = repair_pick(ctx.repairs, "uv_merge", mode="magnitude", top=1.0)
    if d is None or m is None:
        return None, "needs uv_merge direction (orthonormalize: true) and magnitude repairs at top=1.0"
    (dn, dr), (mn, mr) = d, m
    fd, fm = dr.get("ood_recovered_frac"), mr.get("ood_recovered_frac")
    ev = (f"directions restored ({dn}): {recovered(dr)} recovered; "
          f"singular values restored ({mn}): {recovered(mr)} recovered")
    if fd is None or fm is None:
        return None, f"{untestable_gap(dr)}; {ev}"
    return Measured(fd - fm, 0.0, _difference_se(ctx, dr, mr, fd - fm), ev)


def _difference_se(ctx: Context, a: dict, b: dict, diff: float) -> float | None:
    """Delta-method SE of f_a - f_b = (R_a - R_b) / (REF - D) for two repairs of one damaged model:
    sqrt(se_Ra² + se_Rb² + (f_a - f_b)² se_gap²) / |REF - D|, with se_gap the SE of REF - D."""
    n = ctx.n("ood")
    se_a, se_b, se_gap = binomial_se(a["ood_acc"], n), binomial_se(b["ood_acc"], n), a.get("ood_gap_se")
    if se_a is None or se_b is None or se_gap is None:
        return None
    return math.sqrt(se_a**2 + se_b**2 + diff**2 * se_gap**2) / abs(a["ood_gap"])
