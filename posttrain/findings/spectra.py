"""How SFT changed the weights: rotation of singular vectors vs rescaling of singular values
(RL Is Neither a Panacea Nor a Mirage, arXiv 2508.16546)."""

from __future__ import annotations

import math

from posttrain.findings import Context, finding

ROTATES = ("SFT mostly rotates singular vectors rather than rescaling singular values (mean top-k principal "
           "angle, in radians, exceeds the mean top-k relative singular-value change).")
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


@finding("sft_rotates_not_rescales", ROTATES, paper="arXiv 2508.16546")
def sft_rotates_not_rescales(ctx: Context):
    if ctx.sft is None:
        return None, "this run has no SFT method"
    d = ctx.diagnostics.get(ctx.sft, {})
    ang, svc = d.get("principal_angle_top"), d.get("sv_rel_change_top")
    if ang is None or svc is None:
        return None, "no spectral diagnostics (diagnostics.spectral: false)"
    rad = math.radians(ang)
    ev = f"{ctx.sft}: top-k angle {ang:.2f} deg = {rad:.3f} rad vs top-k s.v. change {svc:.3f}"
    r = ctx.diagnostics.get(ctx.rl, {}) if ctx.rl else {}
    if r.get("principal_angle_top") is not None:
        ev += f" ({ctx.rl}: {math.radians(r['principal_angle_top']):.3f} rad vs {r.get('sv_rel_change_top', float('nan')):.3f})"
    return rad > svc, ev


@finding("rotation_at_spectrum_ends", ENDS, paper="arXiv 2508.16546")
def rotation_at_spectrum_ends(ctx: Context):
    if ctx.sft is None:
        return None, "this run has no SFT method"
    ends = curve_ends_vs_middle(ctx.diagnostics.get(ctx.sft, {}).get("angle_curve") or {})
    if ends is None:
        return None, "no principal-angle curve"
    top, bottom, mid = ends
    return top > mid and bottom > mid, f"{ctx.sft}: mean angle top 10% {top:.2f} deg, bottom 10% {bottom:.2f}, middle 50% {mid:.2f}"
