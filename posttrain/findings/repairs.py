"""Can SFT's damage be repaired cheaply? Claims of the spectral-repair literature, checked on the
study's recovery sweep (arXiv 2508.16546, 2509.12235)."""

from __future__ import annotations

from posttrain.findings import Context, finding


def repair_pick(repairs: dict, method: str, source: str = "base", **params) -> tuple[str, dict] | None:
    """The first repair of the sweep made by `method` from `source` (repair.source) with these parameter values."""
    for name, r in repairs.items():
        if r["method"] == method and r.get("source", "base") == source and all(r["params"].get(k) == v for k, v in params.items()):
            return name, r
    return None


def recovered(r: dict) -> str:
    f = r.get("ood_recovered_frac")
    return "n/a" if f is None else f"{100 * f:.0f}%"


def _recovers(ctx: Context, method: str, params: dict) -> tuple[bool | None, str]:
    hit = repair_pick(ctx.repairs, method, **params)
    if hit is None:
        return None, "no such repair in this run's sweep"
    name, r = hit
    f, kept = r.get("ood_recovered_frac"), r.get("id_kept_frac")
    kept_s = "n/a" if kept is None else f"{100 * kept:.0f}%"
    ev = (f"{name}: OOD {r['ood_acc']:.3f} (gap to recover {r['ood_gap']:+.3f}), recovered {recovered(r)}, "
          f"in-domain gain kept {kept_s}")
    return (None if f is None else f >= 0.7), ev


@finding("uv_top20_recovers_ood",
         "Restoring the base's top-20% singular directions recovers >= 70% of SFT's lost OOD accuracy.",
         paper="arXiv 2508.16546")
def uv_top20_recovers_ood(ctx: Context):
    return _recovers(ctx, "uv_merge", {"mode": "direction", "top": 0.2, "bottom": 0.0})


@finding("reset_first_quarter_recovers_ood",
         "Resetting the first 25% of layers to the base recovers >= 70% of SFT's lost OOD accuracy.",
         paper="arXiv 2508.16546")
def reset_first_quarter_recovers_ood(ctx: Context):
    return _recovers(ctx, "reset_layers", {"first_frac": 0.25})


@finding("sft_damage_is_rotation",
         "SFT's damage is a rotation of singular vectors, not a change of singular values: restoring all base "
         "directions recovers more OOD accuracy than restoring all base singular values.", paper="arXiv 2508.16546")
def sft_damage_is_rotation(ctx: Context):
    d = repair_pick(ctx.repairs, "uv_merge", mode="direction", top=1.0)
    m = repair_pick(ctx.repairs, "uv_merge", mode="magnitude", top=1.0)
    if d is None or m is None or d[1].get("ood_recovered_frac") is None or m[1].get("ood_recovered_frac") is None:
        return None, "needs uv_merge direction and magnitude repairs at top=1.0"
    return (d[1]["ood_recovered_frac"] > m[1]["ood_recovered_frac"],
            f"directions restored: {recovered(d[1])} recovered; singular values restored: {recovered(m[1])} recovered")
