"""sweep.json: a sweep's cells side by side (pure: built from each cell's results.json).

For every cell: its axis values, its run directory, the headline metrics as {mean, sd, ci95, values}
over the cell's seeds (`posttrain.aggregate`; one seed gives sd and ci95 None) and each finding's
verdict with `held_in` ("k/n" seeds). Headline metrics: per model id_acc, ood_acc and the in-domain
format shares (with the format, not counting malformed output, of the largest mean share:
`dominant_format`), per method forgetting
and the relative weight update.
"""

from __future__ import annotations

from typing import Any

from posttrain.aggregate import aggregate_results, as_spread, mean_of

HEADLINE_MODEL_KEYS = ("id_acc", "ood_acc")


def as_aggregated(results: dict[str, Any]) -> dict[str, Any]:
    """A cell's results.json in the aggregated shape, whether it ran one seed or several."""
    return results if results.get("kind") == "seeds" else aggregate_results({results["seed"]: results}, {})


def headline(agg: dict[str, Any]) -> dict[str, Any]:
    models = {}
    for name, m in agg["models"].items():
        shares = {f: as_spread(v) for f, v in (m.get("format_share") or {}).items()}
        entry = {k: as_spread(m.get(k)) for k in HEADLINE_MODEL_KEYS}
        entry["format_share"] = shares
        means = {f: s["mean"] for f, s in shares.items() if f != "malformed" and s and s["mean"] is not None}
        entry["dominant_format"] = max(means, key=lambda f: means[f]) if means else None
        models[name] = entry
    diag = agg.get("diagnostics") or {}
    return {"models": models,
            "forgetting": {n: as_spread(v) for n, v in (agg.get("forgetting") or {}).items()},
            "rel_update": {n: as_spread(d.get("rel_update_total")) for n, d in diag.items()
                           if isinstance(d, dict) and d.get("rel_update_total") is not None}}


def summarize_sweep(cfg, cells: list[tuple[str, dict[str, Any], dict[str, Any]]],
                    wall_seconds: float | None = None) -> dict[str, Any]:
    """sweep.json from `cells`: (name, axis values, the cell's results.json), in sweep order."""
    rows, findings = [], {}
    for name, values, results in cells:
        agg = as_aggregated(results)
        rows.append({"name": name, "values": values, "path": f"cells/{name}", "seeds": agg["seeds"],
                     "wall_seconds": agg.get("wall_seconds"), "headline": headline(agg)})
        for f in agg.get("findings", []):
            entry = findings.setdefault(f["id"], {"id": f["id"], "claim": f["claim"], "cells": {}})
            entry["cells"][name] = {"holds": f.get("holds"), "held_in": f.get("held_in"), "evidence": f.get("evidence")}
    return {"kind": "sweep", "study": cfg.name, "axes": dict(cfg.sweep or {}), "seeds": cfg.seeds or [cfg.seed],
            "wall_seconds": None if wall_seconds is None else round(wall_seconds, 2),
            "cells": rows, "findings": list(findings.values())}


def metric_mean(cell: dict[str, Any], section: str, name: str, key: str | None = None) -> float | None:
    """Mean of one headline metric of a sweep.json cell (None when absent)."""
    node = cell["headline"].get(section, {}).get(name)
    if key is not None:
        node = (node or {}).get(key)
    return mean_of(node) if node is not None else None
