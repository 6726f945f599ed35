"""The format shares of the completions a method sampled while it trained, step by step (Echo
Chamber, arXiv 2504.07912, figure 2: on-policy format shares over RL steps).

An on-policy method logs `rollout/format/<fmt>` (share of the step's sampled completions the
task's format classifier assigns to <fmt>; absent: 0) and `rollout/samples` in each step's row of
metrics.jsonl; Expert Iteration logs `filtered/format/<fmt>`, `filtered/samples` and
`filtered/round` for the k samples of the round it trains on, repeated on every step of the round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SOURCES = ("rollout", "filtered")


# the key every row of a sampling step has (a step whose samples were all malformed logs no format)
MARKERS = {"rollout": "rollout/reward", "filtered": "filtered/round"}


def format_series(rows: list[dict]) -> list[dict[str, Any]]:
    """[{step, samples, shares: {format: share}}] from metrics.jsonl rows, one point per sampling
    (each RL step; the first logged step of each Expert Iteration round); empty when none logged
    format shares. `samples` is None in RL logs written before `rollout/samples` was logged."""
    out: list[dict[str, Any]] = []
    rounds: set[int] = set()
    for r in rows:
        for src in SOURCES:
            pre = f"{src}/format/"
            if MARKERS[src] not in r:
                continue
            if src == "filtered":
                if r["filtered/round"] in rounds:
                    continue
                rounds.add(r["filtered/round"])
            n = r.get(f"{src}/samples")
            out.append({"step": r["step"], "samples": None if n is None else int(n),
                        "shares": {k[len(pre):]: float(v) for k, v in r.items() if k.startswith(pre)}})
            break
    return out


def read_format_series(metrics: Path) -> list[dict[str, Any]]:
    """`format_series` of a metrics.jsonl file (missing file or torn last line: what is readable)."""
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return format_series(rows)


def window_share(points: list[dict], fmt: str) -> tuple[float, int]:
    """(share of `fmt` among all samples of `points`, weighted by their sample counts; the count)."""
    n = sum(p["samples"] for p in points)
    if n == 0:
        return 0.0, 0
    return sum(p["shares"].get(fmt, 0.0) * p["samples"] for p in points) / n, n


def start_end(points: list[dict], frac: float = 0.1) -> tuple[list[dict], list[dict]] | None:
    """The first and the last max(1, floor(frac * len)) points (disjoint); None with fewer than 2."""
    if len(points) < 2:
        return None
    w = max(1, min(int(frac * len(points)), len(points) // 2))
    return points[:w], points[-w:]
