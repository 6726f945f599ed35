"""Weight diagnostics over a training run's checkpoint sequence (`posttrain diff --trajectory`).

Every `step-<N>` checkpoint of each run is compared with the base in ONE streamed pass (each base
tensor is read once for all of them), and consecutive checkpoints of a run are compared with each
other through their updates: `cosine_prev` = cos(dW_s, dW_prev) tells whether training keeps moving
in the same direction, and `step_distance` = ||W_s - W_prev||_F / ||W_base||_F how far it moved
since the previous checkpoint. A point per checkpoint:

    {"run", "step", "rel_update_total", "changed_frac", "unchanged_frac", "cosine_prev",
     "step_distance", "rel_update/<module>", and with spectral: "principal_angle_top",
     "principal_angle_bottom", "sv_rel_change_top", "energy_rotation"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from posttrain.analysis.diff import DiffResult, diff, write_outputs
from posttrain.errors import UserError
from posttrain.io import atomic_write_bytes, atomic_write_json, atomic_write_text

_STEP = re.compile(r"step-(\d+)")


def find_checkpoints(path: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of the `step-<N>` checkpoints in `path` or `path/checkpoints`, by step."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if root.is_dir():
            found = sorted((int(m.group(1)), p) for p in root.iterdir()
                           if p.is_dir() and (m := _STEP.fullmatch(p.name)))
            if found:
                return found
    return []


def discover_runs(paths: list[str | Path]) -> dict[str, list[tuple[int, Path]]]:
    """Checkpoint sequences named by run: a study run directory expands to one run per
    `methods/<method>/`, a method directory (or its `checkpoints/`) is one run."""
    runs: dict[str, list[tuple[int, Path]]] = {}
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"trajectory: not a directory: {p}")
        found = {}
        if (p / "methods").is_dir():
            for m in sorted((p / "methods").iterdir()):
                if cks := find_checkpoints(m):
                    found[m.name] = cks
        elif cks := find_checkpoints(p):
            found[p.parent.name if p.name == "checkpoints" else p.name] = cks
        if not found:
            raise UserError(f"trajectory: no step-<N> checkpoints under {p} (expected {p}/checkpoints/step-<N>/ "
                            f"or {p}/methods/<method>/checkpoints/step-<N>/)")
        for name, cks in found.items():
            k, key = 2, name
            while key in runs:
                key, k = f"{name}-{k}", k + 1
            runs[key] = cks
    return runs


@dataclass
class TrajectoryResult:
    result: DiffResult  # the underlying multi-checkpoint diff (models named "<run>@<step>")
    points: list[dict]

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.points)

    def to_json(self) -> dict:
        runs: dict[str, list[dict]] = {}
        for p in self.points:
            runs.setdefault(p["run"], []).append(p)
        return {"base": self.result.base, "runs": runs}


SPECTRAL_KEYS = ("principal_angle_top", "principal_angle_bottom", "sv_rel_change_top", "energy_rotation")


def trajectory(base: str | Path, runs: dict[str, list[tuple[int, Path]]] | list[str | Path],
               out_dir: str | Path | None = None, plots: bool = True, show_progress: bool = True,
               **diff_kwargs) -> TrajectoryResult:
    """Diagnostics of every checkpoint of `runs` (as from `discover_runs`, or paths to discover) against
    `base`; `diff_kwargs` go to `diff` (spectral, rank, top_frac, device, ...)."""
    if not isinstance(runs, dict):
        runs = discover_runs(runs)
    models: dict[str, Path] = {}
    pairs: list[tuple[str, str]] = []
    for run, cks in runs.items():
        prev = None
        for step, path in cks:
            key = f"{run}@{step}"
            models[key] = path
            if prev is not None:
                pairs.append((prev, key))
            prev = key
    diff_kwargs.setdefault("compare_pairs", pairs)
    res = diff(base, models, None, plots=False, show_progress=show_progress, **diff_kwargs)
    prev_of = {b: a for a, b in pairs}
    points = []
    for run, cks in runs.items():
        for step, path in cks:
            key = f"{run}@{step}"
            s = res.summaries[key].to_json()
            p = {"run": run, "step": step, "checkpoint": str(path),
                 "rel_update_total": s["rel_update_total"], "changed_frac": s.get("changed_frac"),
                 "unchanged_frac": s.get("unchanged_frac"), "cosine_prev": None, "step_distance": None}
            pair = res.pairs.get((prev_of.get(key), key))
            if pair is not None:
                p["cosine_prev"], p["step_distance"] = pair.cosine_total, pair.rel_distance_total
            for k in SPECTRAL_KEYS:
                if k in s:
                    p[k] = s[k]
            for m, v in s["rel_update_by_module"].items():
                p[f"rel_update/{m}"] = v
            points.append(p)
    out = TrajectoryResult(res, points)
    if out_dir is not None:
        write_trajectory(out, Path(out_dir), plots)
    return out


def write_trajectory(tr: TrajectoryResult, out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(tr.result, out, plots=False)
    table = tr.table
    atomic_write_text(out / "trajectory.csv", table.to_csv(index=False))
    atomic_write_json(out / "trajectory.json", tr.to_json())
    if plots:
        from posttrain.report import plots as P

        atomic_write_bytes(out / "trajectory.png", P.to_png(P.trajectories(tr.points)))
        # heatmaps of each run's last checkpoint only: one panel per checkpoint would not be readable
        last = {}
        for p in tr.points:
            last[p["run"]] = f"{p['run']}@{p['step']}"
        js = {run: tr.result.summaries[key].to_json() for run, key in last.items()}
        atomic_write_bytes(out / "rel_update_heatmap.png", P.to_png(P.update_heatmaps(js)))
        if any("principal_angle_top_by_layer_module" in v for v in js.values()):
            atomic_write_bytes(out / "principal_angle_heatmap.png", P.to_png(P.angle_heatmaps(js)))
            atomic_write_bytes(out / "angle_curves.png", P.to_png(P.angle_curves(js)))
