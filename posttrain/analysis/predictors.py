"""How well a per-model quantity predicts forgetting across models: Spearman's rho and the R^2 of a
least-squares line (RL's Razor, arXiv 2509.04259, fits forgetting against the KL to the base on the
new task and compares it with weight-change predictors).

Everything here is a pure function of a list of points, one per trained model, each a dict with
"forgetting" and any of the `PREDICTORS` keys (None or absent where unknown). A study builds them with
`points_from_results`; a multi-seed study or a sweep concatenates the points of all its cells and
seeds and calls `predictor_fits` once.
"""

from __future__ import annotations

import math
from typing import Any

# predictor key -> label; the KL keys are `posttrain.evaluation.kl.kl_to_base` outputs
PREDICTORS = {
    "kl_pi0_pi_per_seq": "KL(pi0 || pi) per sequence (RL's Razor)",
    "kl_pi0_pi_per_token": "KL(pi0 || pi) per token",
    "kl_pi_pi0_per_seq": "KL(pi || pi0) per sequence",
    "kl_pi_pi0_per_token": "KL(pi || pi0) per token",
    "rel_update_total": "relative weight update ||dW|| / ||W0||",
}


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks of `xs`, tied values sharing the mean of the ranks they span ([10, 20, 20, 30]
    -> [1, 2.5, 2.5, 4])."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r = sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2); None when either
    variable is constant or there are fewer than 2 points (r is undefined)."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} x values and {len(y)} y values")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)))


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: Pearson's r of the ranks, ties averaged (`ranks`). Equals
    1 - 6 sum d_i^2 / (n (n^2 - 1)) when there are no ties (d_i: rank differences). None when undefined."""
    return pearson(ranks(x), ranks(y))


def line_fit(x: list[float], y: list[float]) -> dict[str, float] | None:
    """Least-squares line y = a + b x and its R^2 = 1 - SS_res / SS_tot (for a line with intercept,
    the square of Pearson's r). None when x or y is constant or there are fewer than 3 points (two
    points fit any line exactly: R^2 = 1 says nothing)."""
    n = len(x)
    r = pearson(x, y)
    if n < 3 or r is None:
        return None
    mx, my = sum(x) / n, sum(y) / n
    b = sum((a - mx) * (c - my) for a, c in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return {"r2": r * r, "slope": b, "intercept": my - b * mx}


def predictor_fits(points: list[dict[str, Any]], target: str = "forgetting",
                   predictors: dict[str, str] = PREDICTORS) -> dict[str, dict[str, Any]]:
    """Per predictor: {n, rho, r2, slope, intercept} of `target` against it, over the points where both
    are known numbers (rho and the line None where undefined)."""
    out = {}
    for key in predictors:
        pairs = [(p[key], p[target]) for p in points if _num(p.get(key)) and _num(p.get(target))]
        xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
        fit = line_fit(xs, ys) or {"r2": None, "slope": None, "intercept": None}
        out[key] = {"n": len(pairs), "rho": spearman(xs, ys), **fit}
    return out


def points_from_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per trained model of a study's results.json: its name, forgetting, KLs to the base
    (`kl_to_base`) and relative weight update (`diagnostics.<m>.rel_update_total`)."""
    kl = results.get("kl_to_base") or {}
    diag = results.get("diagnostics") or {}
    pts = []
    for name, forg in (results.get("forgetting") or {}).items():
        p: dict[str, Any] = {"name": name, "forgetting": forg}
        p.update({k: (kl.get(name) or {}).get(k) for k in PREDICTORS if k.startswith("kl_")})
        p["rel_update_total"] = (diag.get(name) or {}).get("rel_update_total")
        pts.append(p)
    return pts


def pooled_points(results_by_run: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The points of several studies' results.json (seeds, sweep cells) in one list, each model
    named "<run>/<model>" (e.g. "seed-1/sft")."""
    return [{**p, "name": f"{run}/{p['name']}"} for run, res in results_by_run.items() for p in points_from_results(res)]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
