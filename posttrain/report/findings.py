"""The findings table: which published claims held in this run, each with its numbers.

A claim's verdict is computed from `results.json` alone, by a rule stated in the claim's text;
`holds` is None when the run lacks what the claim needs (say, no RL method). Nothing here tunes
a threshold to make a claim hold: each rule is fixed in advance and documented.
"""

from __future__ import annotations

from typing import Any

from posttrain.config import StudyConfig

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def pick_methods(cfg: StudyConfig, results: dict) -> tuple[str | None, str | None]:
    """The first SFT-on-expert-data method and the first RL method (an objective that learns from
    rewards, by its declared traits) of the study, if any."""
    done = results["models"]
    sft = next((n for n, m in cfg.methods.items() if n in done and m.is_expert_sft), None)
    rl = next((n for n, m in cfg.methods.items() if n in done and m.is_rl), None)
    return sft, rl


def _f(x: float) -> str:
    return f"{x:.3f}"


def _claim(cid: str, claim: str, holds: bool | None, evidence: str) -> dict[str, Any]:
    return {"id": cid, "claim": claim, "holds": holds, "evidence": evidence}


def mid_layer_mlp(diag: dict) -> float | None:
    """Relative update of the MLP weights of the middle third of the layers (norm-aggregated
    as sqrt(mean of squared per-cell values), i.e. equal weight per cell)."""
    cells = diag.get("rel_update_by_layer_module", {})
    n = max((len(v) for v in cells.values()), default=0)
    if n == 0:
        return None
    lo, hi = n // 3, max(n // 3 + 1, (2 * n + 2) // 3)
    vals = [cells[m][i] for m in MLP if m in cells for i in range(lo, hi) if cells[m][i] is not None]
    return (sum(v * v for v in vals) / len(vals)) ** 0.5 if vals else None


def top_format(shares: dict[str, float]) -> tuple[str | None, float]:
    valid = {k: v for k, v in shares.items() if k != "malformed"}
    if not valid:
        return None, 0.0
    k = max(valid, key=valid.get)
    return k, valid[k]


def evaluate_findings(results: dict, cfg: StudyConfig) -> list[dict[str, Any]]:
    models, forg, diag = results["models"], results["forgetting"], results["diagnostics"]
    base = models["base"]
    sft, rl = pick_methods(cfg, results)
    out: list[dict[str, Any]] = []
    missing = "this run has no " + " and no ".join(x for x, y in (("SFT method", sft), ("RL method", rl)) if y is None)

    def gain(name: str, key: str) -> float:
        return models[name][key] - base[key]

    for name, cid, label in ((sft, "sft_gains_id", "SFT"), (rl, "rl_gains_id", "RL")):
        if name is None:
            out.append(_claim(cid, f"{label} raises in-domain accuracy over the base.", None, missing))
        else:
            g = gain(name, "id_acc")
            out.append(_claim(cid, f"{label} raises in-domain accuracy over the base.", g > 0,
                              f"{name}: id_acc {_f(base['id_acc'])} -> {_f(models[name]['id_acc'])} ({g:+.3f})"))
    if sft is None or rl is None:
        for cid, claim in (
            ("sft_gains_more_id", "SFT on expert data gains more in-domain than RL."),
            ("sft_forgets_more", "SFT forgets more than RL (larger mean drop on retention probes)."),
            ("rl_forgets_little", "RL forgets little: mean retention drop below 0.05."),
            ("rl_generalizes_ood", "RL generalises better out of domain than SFT (larger OOD change)."),
            ("sft_moves_mlp_more", "SFT moves mid-layer MLP weights more than RL (relative update ratio > 1.5)."),
        ):
            out.append(_claim(cid, claim, None, missing))
    else:
        gs, gr = gain(sft, "id_acc"), gain(rl, "id_acc")
        out.append(_claim("sft_gains_more_id", "SFT on expert data gains more in-domain than RL.", gs > gr,
                          f"id gain {sft} {gs:+.3f} vs {rl} {gr:+.3f}"))
        out.append(_claim("sft_forgets_more", "SFT forgets more than RL (larger mean drop on retention probes).",
                          forg[sft] > forg[rl], f"forgetting {sft} {forg[sft]:+.3f} vs {rl} {forg[rl]:+.3f}"))
        out.append(_claim("rl_forgets_little", "RL forgets little: mean retention drop below 0.05.",
                          forg[rl] < 0.05, f"forgetting {rl} {forg[rl]:+.3f}"))
        os_, or_ = gain(sft, "ood_acc"), gain(rl, "ood_acc")
        out.append(_claim("rl_generalizes_ood", "RL generalises better out of domain than SFT (larger OOD change).",
                          or_ > os_, f"ood change {sft} {os_:+.3f} vs {rl} {or_:+.3f} (base ood {_f(base['ood_acc'])})"))
        ms, mr = (mid_layer_mlp(diag.get(n, {})) for n in (sft, rl))
        if ms is None or mr is None or mr == 0:
            out.append(_claim("sft_moves_mlp_more", "SFT moves mid-layer MLP weights more than RL (relative update ratio > 1.5).",
                              None, "no per-layer MLP diagnostics"))
        else:
            out.append(_claim("sft_moves_mlp_more", "SFT moves mid-layer MLP weights more than RL (relative update ratio > 1.5).",
                              ms / mr > 1.5, f"mid-layer MLP rel. update {sft} {ms:.2e} vs {rl} {mr:.2e} (ratio {ms / mr:.2f})"))

    qk = []
    for name in (n for n in (sft, rl) if n is not None and n in diag):
        by_mod = {m: v for m, v in diag[name].get("rel_update_by_module", {}).items() if m in LINEAR}
        if by_mod and max(by_mod.values()) > 0:  # a method that never updated has no "top" module
            ranked = sorted(by_mod, key=by_mod.get, reverse=True)
            qk.append((name, ranked[0] in ("q_proj", "k_proj"), ", ".join(f"{m} {by_mod[m]:.2e}" for m in ranked[:3])))
    out.append(_claim("qk_change_most", "Attention query/key weights change most (top linear module is q_proj or k_proj, for every method).",
                      all(h for _, h, _ in qk) if qk else None,
                      "; ".join(f"{n}: top {ev}" for n, _, ev in qk) or "no diagnostics"))

    out += spectral_findings(diag, sft, rl)
    out += repair_findings(results.get("repairs", {}))

    if rl is None:
        out.append(_claim("rl_format_collapse", "RL collapses outputs onto one format (top format share >= 0.9 and above the base's).",
                          None, missing))
    else:
        fb, sb = top_format(base["format_share"])
        fr, sr = top_format(models[rl]["format_share"])
        out.append(_claim("rl_format_collapse", "RL collapses outputs onto one format (top format share >= 0.9 and above the base's).",
                          sr >= 0.9 and sr > sb,
                          f"sampled format shares: base top {fb} {sb:.2f}; {rl} top {fr} {sr:.2f}"))
    return out


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


def spectral_findings(diag: dict, sft: str | None, rl: str | None) -> list[dict[str, Any]]:
    """Claims about HOW SFT changed the weights: rotation of singular vectors vs rescaling of values."""
    import math

    c1 = ("SFT mostly rotates singular vectors rather than rescaling singular values (mean top-k principal "
          "angle, in radians, exceeds the mean top-k relative singular-value change).")
    c2 = ("The rotation concentrates at the top and bottom of the spectrum (SFT's principal angle in both the "
          "top and the bottom 10% of the spectrum exceeds its mean over the middle 50%).")
    d = diag.get(sft, {}) if sft else {}
    if sft is None:
        return [_claim("sft_rotates_not_rescales", c1, None, "this run has no SFT method"),
                _claim("rotation_at_spectrum_ends", c2, None, "this run has no SFT method")]
    out = []
    ang, svc = d.get("principal_angle_top"), d.get("sv_rel_change_top")
    if ang is None or svc is None:
        out.append(_claim("sft_rotates_not_rescales", c1, None, "no spectral diagnostics (diagnostics.spectral: false)"))
    else:
        rad = math.radians(ang)
        ev = f"{sft}: top-k angle {ang:.2f} deg = {rad:.3f} rad vs top-k s.v. change {svc:.3f}"
        if rl and diag.get(rl, {}).get("principal_angle_top") is not None:
            r = diag[rl]
            ev += f" ({rl}: {math.radians(r['principal_angle_top']):.3f} rad vs {r.get('sv_rel_change_top', float('nan')):.3f})"
        out.append(_claim("sft_rotates_not_rescales", c1, rad > svc, ev))
    ends = curve_ends_vs_middle(d.get("angle_curve") or {})
    if ends is None:
        out.append(_claim("rotation_at_spectrum_ends", c2, None, "no principal-angle curve"))
    else:
        top, bottom, mid = ends
        out.append(_claim("rotation_at_spectrum_ends", c2, top > mid and bottom > mid,
                          f"{sft}: mean angle top 10% {top:.2f} deg, bottom 10% {bottom:.2f}, middle 50% {mid:.2f}"))
    return out


def _repair_pick(repairs: dict, method: str, **params) -> tuple[str, dict] | None:
    for name, r in repairs.items():
        if r["method"] == method and all(r["params"].get(k) == v for k, v in params.items()):
            return name, r
    return None


def _rec(r: dict) -> str:
    f = r.get("ood_recovered_frac")
    return "n/a" if f is None else f"{100 * f:.0f}%"


def repair_findings(repairs: dict) -> list[dict[str, Any]]:
    """Claims of the spectral-repair literature, checked on the recovery sweep's numbers."""
    out = []
    specs = [
        ("uv_top20_recovers_ood", "Restoring the base's top-20% singular directions recovers >= 70% of SFT's lost OOD accuracy.",
         ("uv_merge", {"mode": "direction", "top": 0.2, "bottom": 0.0})),
        ("reset_first_quarter_recovers_ood", "Resetting the first 25% of layers to the base recovers >= 70% of SFT's lost OOD accuracy.",
         ("reset_layers", {"first_frac": 0.25})),
    ]
    for cid, claim, (method, params) in specs:
        hit = _repair_pick(repairs, method, **params)
        if hit is None:
            out.append(_claim(cid, claim, None, "no such repair in this run's sweep"))
            continue
        name, r = hit
        f = r.get("ood_recovered_frac")
        kept = r.get("id_kept_frac")
        kept_s = "n/a" if kept is None else f"{100 * kept:.0f}%"
        ev = (f"{name}: OOD {r['ood_acc']:.3f} (gap to recover {r['ood_gap']:+.3f}), recovered {_rec(r)}, "
              f"in-domain gain kept {kept_s}")
        out.append(_claim(cid, claim, None if f is None else f >= 0.7, ev))
    d = _repair_pick(repairs, "uv_merge", mode="direction", top=1.0)
    m = _repair_pick(repairs, "uv_merge", mode="magnitude", top=1.0)
    claim = "SFT's damage is a rotation of singular vectors, not a change of singular values: restoring all base directions recovers more OOD accuracy than restoring all base singular values."
    if d is None or m is None or d[1].get("ood_recovered_frac") is None or m[1].get("ood_recovered_frac") is None:
        out.append(_claim("sft_damage_is_rotation", claim, None, "needs uv_merge direction and magnitude repairs at top=1.0"))
    else:
        out.append(_claim("sft_damage_is_rotation", claim, d[1]["ood_recovered_frac"] > m[1]["ood_recovered_frac"],
                          f"directions restored: {_rec(d[1])} recovered; singular values restored: {_rec(m[1])} recovered"))
    return out
