"""How SFT changed the weights: rotation of singular vectors vs rescaling of singular values
(RL Is Neither a Panacea Nor a Mirage, arXiv 2508.16546)."""

from __future__ import annotations

import math

from posttrain.analysis.tensor_metrics import NULL_DRAWS
from posttrain.findings import Context, Measured, finding

ROTATES = ("SFT mostly rotates singular vectors rather than rescaling singular values, beyond what a random update "
           "does (rule: SFT's rotation-to-rescaling ratio, mean top-k principal angle in radians over mean top-k "
           "relative singular-value change, must exceed the mean ratio of norm-matched random updates of the same "
           "matrices (per matrix the same ||dW||_F as SFT's, i.i.d. Gaussian direction, seeded by the study seed; "
           f"{NULL_DRAWS} draws; both ratios over the matrices that have a null, every matrix decomposed by an SVD) "
           "by more than twice the draws' standard deviation; several seeds: a 95% paired "
           "interval over seeds of the margin must exclude 0; otherwise within noise).")
ENDS = ("The rotation concentrates at the top and bottom of the spectrum (SFT's principal angle in both the "
        "top and the bottom 10% of the spectrum exceeds its mean over the middle 50%).")


def curve_ends_vs_middle(curve: dict) -> tuple[float, float, float] | None:
    """(top 10%, bottom 10%, middle 50%) means of an angle curve {"x", "left", "right"} (both sides)."""
    xs = curve.get("x") or []
    pts = [(x, v) for side in ("left", "right") for x, v in zip(xs, curve.get(side) or []) if v is not None]
    top = [v for x, v in pts if x <= 0.1]
    bottom = [v for x, v in pts if x >= 0.9]
    mid = [v for x, v in pts if 0.25 <= x <= 0.75]
    if not (top and bottom and mid):
        return None
    return sum(top) / len(top), sum(bottom) / len(bottom), sum(mid) / len(mid)


def rotation_ratio(angle_deg: float | None, sv_change: float | None) -> float | None:
    """Rotation-to-rescaling ratio: mean top-k principal angle (radians) / mean top-k relative
    singular-value change (None when either is missing or not finite, or the change is 0)."""
    if angle_deg is None or sv_change is None or not (math.isfinite(angle_deg) and math.isfinite(sv_change)):
        return None
    return math.radians(angle_deg) / sv_change if sv_change > 0 else None


def null_ratios(d: dict) -> list[float] | None:
    """The rotation-to-rescaling ratio of each random-update draw in one method's diagnostics
    (`null_principal_angle_top_d<i>`, `null_sv_rel_change_top_d<i>`); None unless every draw has one."""
    out = [rotation_ratio(d.get(f"null_principal_angle_top_d{i}"), d.get(f"null_sv_rel_change_top_d{i}"))
           for i in range(NULL_DRAWS)]
    return None if any(r is None for r in out) else out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of `xs` (n >= 2)."""
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _coverage(d: dict) -> str:
    """Which matrices the comparison covers, when the null is missing on some of them."""
    k, n = d.get("null_set_matrices"), d.get("angle_matrices")
    if k is None or n is None or k == n:
        return ""
    return (f" on the {k:.0f} of {n:.0f} matrices that have a null (those analysed through their Gram matrix "
            f"have none)")


def _describe(d: dict) -> tuple[float | None, list[float] | None, str]:
    """(ratio, the random updates' ratios, evidence) of one method's diagnostics; the ratio is over
    the matrices that have a null (`null_set_*`), all of them whenever every matrix had an SVD."""
    ang, svc = d.get("null_set_principal_angle_top"), d.get("null_set_sv_rel_change_top")
    r, nulls = rotation_ratio(ang, svc), null_ratios(d)
    if r is None:
        return r, nulls, ""
    ev = f"top-k angle {ang:.2f} deg vs s.v. change {svc:.2e} (ratio {r:.3g}){_coverage(d)}"
    if nulls is not None:
        mean, sd = mean_sd(nulls)
        ev += (f"; random updates of the same norm: {d['null_principal_angle_top']:.2f} deg vs "
               f"{d['null_sv_rel_change_top']:.2e} (ratio {mean:.3g} ± {sd:.2g} SD over {len(nulls)} draws)")
    return r, nulls, ev


@finding("sft_rotates_not_rescales", ROTATES, paper="arXiv 2508.16546")
def sft_rotates_not_rescales(ctx: Context):
    if ctx.sft is None:
        return None, "this run has no SFT method"
    d = ctx.diagnostics.get(ctx.sft, {})
    if d.get("principal_angle_top") is None or d.get("sv_rel_change_top") is None:
        return None, "no spectral diagnostics (diagnostics.spectral: false)"
    if null_ratios(d) is None:
        if d.get("null_set_matrices") == 0 and d.get("angle_matrices"):
            return None, (f"{ctx.sft}: none of its {d['angle_matrices']:.0f} matrices has a random-update null (every "
                          f"one was analysed through its Gram matrix; the null needs an SVD)")
        return None, f"{ctx.sft}: no random-update null in the diagnostics (rerun the diagnostics stage)"
    if "null_set_principal_angle_top" not in d or "null_set_sv_rel_change_top" not in d:
        return None, (f"{ctx.sft}: no angle and s.v. change of its own on the null's matrices (diagnostics written "
                      f"before they were; rerun the diagnostics stage)")
    r, nulls, ev = _describe(d)
    if r is None:
        return None, (f"{ctx.sft}: no rotation-to-rescaling ratio on the null's matrices (s.v. change "
                      f"{d['null_set_sv_rel_change_top']})")
    mean, sd = mean_sd(nulls)
    if ctx.rl:
        _, _, rev = _describe(ctx.diagnostics.get(ctx.rl, {}))
        if rev:
            ev += f" ({ctx.rl}: {rev})"
    return Measured(r, mean, sd, f"{ctx.sft}: {ev}")


@finding("rotation_at_spectrum_ends", ENDS, paper="arXiv 2508.16546")
def rotation_at_spectrum_ends(ctx: Context):
    if ctx.sft is None:
        return None, "this run has no SFT method"
    ends = curve_ends_vs_middle(ctx.diagnostics.get(ctx.sft, {}).get("angle_curve") or {})
    if ends is None:
        return None, "no principal-angle curve"
    top, bottom, mid = ends
    return top > mid and bottom > mid, f"{ctx.sft}: mean angle top 10% {top:.2f} deg, bottom 10% {bottom:.2f}, middle 50% {mid:.2f}"
