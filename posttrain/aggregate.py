"""Aggregation of several seeds' results.json into one: every numeric leaf becomes its spread.

Pure functions of JSON-like values (dicts, lists, numbers, strings, bools, None); no I/O.

A numeric leaf (int or float, not bool) measured in n seeds becomes::

    {"mean": m, "sd": s, "ci95": [lo, hi], "values": [v_seed0, v_seed1, ...]}

with m the mean, s the sample standard deviation sqrt(sum (v - m)^2 / (n - 1)), and [lo, hi] the 95%
t-interval of the mean m -/+ t_{0.975, n-1} s / sqrt(n) (Student's t; the same critical value as the
findings' paired interval, `posttrain.findings.t975`). With a single value sd and ci95 are None.
A seed that lacks the leaf, or holds null there, contributes None to `values` and is left out of the
statistics. Dicts are aggregated key by key (union of the keys, in first-seen order); lists element
by element when every seed's list has the same length. A non-numeric leaf (string, bool, null) is
kept as it is when every seed holds the same value, else becomes ``{"values": [...]}``; so do lists
of unequal lengths.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from posttrain.findings import aggregate_findings, paired_interval

MISSING = object()

# sections of results.json whose numbers are aggregated over seeds
AGGREGATED = ("models", "n_problems", "forgetting", "diagnostics", "diagnostic_pairs", "trajectories", "training",
              "repairs")
# sections that describe the study rather than measure it (must agree across seeds)
SHARED = ("study", "id_task", "ood_task", "retention_tasks")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def spread(values: list[float | None]) -> dict[str, Any]:
    """{mean, sd, ci95, values} of one metric over seeds (None entries: that seed has no value).

    mean = sum(v) / n; sd = sqrt(sum (v - mean)^2 / (n - 1)) (sample sd); ci95 = mean -/+ t_{0.975,n-1} sd / sqrt(n).
    """
    present = [float(v) for v in values if v is not None]
    out: dict[str, Any] = {"mean": None, "sd": None, "ci95": None, "values": list(values)}
    if not present:
        return out
    out["mean"] = statistics.fmean(present)
    if len(present) >= 2:
        out["sd"] = statistics.stdev(present)
        _, lo, hi = paired_interval(present)
        out["ci95"] = [lo, hi]
    return out


def aggregate_values(items: list[Any]) -> Any:
    """Aggregate one node held by every seed (`MISSING` where a seed lacks it); see the module doc."""
    present = [x for x in items if x is not MISSING and x is not None]
    if present and all(is_number(x) for x in present):
        return spread([x if x is not MISSING else None for x in items])
    if present and all(isinstance(x, dict) for x in present):
        keys = list(dict.fromkeys(k for x in present for k in x))
        return {k: aggregate_values([x.get(k, MISSING) if isinstance(x, dict) else MISSING for x in items])
                for k in keys}
    plain = [None if x is MISSING else x for x in items]
    if (present and all(isinstance(x, list) for x in present) and len(present) == len(items)
            and len({len(x) for x in present}) == 1):
        return [aggregate_values([x[i] for x in present]) for i in range(len(present[0]))]
    if all(x == plain[0] for x in plain):
        return plain[0]
    return {"values": plain}


def aggregate_results(per_seed: dict[int, dict[str, Any]], paths: dict[int, str] | None = None) -> dict[str, Any]:
    """One results.json for a multi-seed study from each seed's results.json (`per_seed`, keyed by seed).

    The metric sections (`AGGREGATED`) are aggregated leaf by leaf in seed order; `findings` is the
    multi-seed verdict of `posttrain.findings.aggregate_findings` (each with `held_in: "k/n"`);
    `seeds` lists the seeds, `runs` each seed's run directory (`paths`), `wall_seconds` the total.
    Raises ValueError when the seeds ran different studies (their `SHARED` fields differ).
    """
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    seeds = sorted(per_seed)
    rows = [per_seed[s] for s in seeds]
    for key in SHARED:
        if len({repr(r.get(key)) for r in rows}) > 1:
            raise ValueError(f"the seeds' results disagree on {key!r}: not one study")
    out: dict[str, Any] = {"kind": "seeds", **{k: rows[0].get(k) for k in SHARED}, "seeds": seeds,
                           "runs": {str(s): (paths or {}).get(s, f"seed-{s}") for s in seeds},
                           "wall_seconds": round(sum(r.get("wall_seconds") or 0.0 for r in rows), 2)}
    for key in AGGREGATED:
        out[key] = aggregate_values([r.get(key, MISSING) for r in rows])
    out["findings"] = aggregate_findings({s: per_seed[s].get("findings", []) for s in seeds})
    return out


def mean_of(node: Any) -> Any:
    """The mean of an aggregated leaf ({mean, ...}), or the node itself when it is a plain value."""
    return node.get("mean") if isinstance(node, dict) and "mean" in node and "values" in node else node


def as_spread(node: Any) -> dict[str, Any] | None:
    """An aggregated leaf as {mean, sd, ci95, values}; a plain number as the spread of one value."""
    if isinstance(node, dict) and "values" in node and "mean" in node:
        return node
    return spread([node]) if is_number(node) else None
