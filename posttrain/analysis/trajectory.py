"""Weight diagnostics over a training run's checkpoint sequence (`posttrain diff --trajectory`).

Every `step-<N>` checkpoint of each run is compared with the base in ONE streamed pass (each base
tensor is read once for all of them), and consecutive checkpoints of a run are compared with each
other through their updates: `cosine_prev` = cos(dW_s, dW_prev) tells whether training keeps moving
in the same direction, and `step_distance` = ||W_s - W_prev||_F / ||W_base||_F how far it moved
since the previous checkpoint. A point per checkpoint:

    {"run", "step", "checkpoint", "cosine_prev", "step_distance", and the aggregates the diagnostics
     table marks for trajectories (`diagnostics.trajectory_values`): "rel_update_total",
     "rel_update/<module>", "changed_frac", "unchanged_frac", and with spectral "principal_angle_top",
     "principal_angle_bottom", "sv_rel_change_top", "energy_rotation" (the reference normalisation, by ||dW||_F^2)}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from posttrain.analysis.checkpoints import step_dirs
from posttrain.analysis.diagnostics import trajectory_values
from posttrain.analysis.diff import DiffResult, diff, write_outputs
from posttrain.errors import UserError
from posttrain.io import atomic_write_bytes, atomic_write_json, atomic_write_text

def find_checkpoints(path: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of the `step-<N>` checkpoints in `path` or `path/checkpoints`, by step."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if found := step_dirs(root):
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


def step_key(run: str, step: int) -> str:
    """The model name of a run's checkpoint in the underlying diff."""
    return f"{run}@{step}"


@dataclass
class TrajectoryResult:
    result: DiffResult  # the underlying multi-checkpoint diff (models named by `key`, "<run>@<step>")
    points: list[dict]
    key: Callable[[str, int], str] = step_key

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.points)

    def to_json(self) -> dict:
        runs: dict[str, list[dict]] = {}
        for p in self.points:
            runs.setdefault(p["run"], []).append(p)
        return {"base": self.result.base, "runs": runs}


def trajectory_plan(runs: dict[str, list[tuple[int, Path]]], key: Callable[[str, int], str] = step_key
                    ) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """The models ({name: dir}) and consecutive-checkpoint pairs that a diff must cover for the
    trajectories of `runs`; `key` names each (run, step)."""
    models: dict[str, Path] = {}
    pairs: list[tuple[str, str]] = []
    for run, cks in runs.items():
        prev = None
        for step, path in cks:
            k = key(run, step)
            models[k] = path
            if prev is not None:
                pairs.append((prev, k))
            prev = k
    return models, pairs


def trajectory_points(res: DiffResult, runs: dict[str, list[tuple[int, Path]]],
                      key: Callable[[str, int], str] = step_key) -> list[dict]:
    """One point per checkpoint of `runs`, from a diff that covered `trajectory_plan(runs, key)`."""
    points = []
    for run, cks in runs.items():
        prev = None
        for step, path in cks:
            k = key(run, step)
            p = {"run": run, "step": step, "checkpoint": str(path), "cosine_prev": None, "step_distance": None,
                 **trajectory_values(res.summaries[k].to_json())}
            pair = res.pairs.get((prev, k))
            if pair is not None:
                p["cosine_prev"], p["step_distance"] = pair.cosine_total, pair.rel_distance_total
            points.append(p)
            prev = k
    return points


def trajectory(base: str | Path, runs: dict[str, list[tuple[int, Path]]] | list[str | Path],
               out_dir: str | Path | None = None, plots: bool = True, show_progress: bool = True,
               **diff_kwargs) -> TrajectoryResult:
    """Diagnostics of every checkpoint of `runs` (as from `discover_runs`, or paths to discover) against
    `base`; `diff_kwargs` go to `diff` (spectral, rank, top_frac, device, ...)."""
    if not isinstance(runs, dict):
        runs = discover_runs(runs)
    models, pairs = trajectory_plan(runs)
    diff_kwargs.setdefault("compare_pairs", pairs)
    res = diff(base, models, None, plots=False, show_progress=show_progress, **diff_kwargs)
    out = TrajectoryResult(res, trajectory_points(res, runs))
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
        from posttrain.analysis.diagnostics import heatmaps
        from posttrain.report import plots as P

        atomic_write_bytes(out / "trajectory.png", P.to_png(P.trajectories(tr.points)))
        # heatmaps of each run's last checkpoint only: one panel per checkpoint would not be readable
        last = {p["run"]: p for p in tr.points}
        js = {run: tr.result.summaries[tr.key(run, p["step"])].to_json() for run, p in last.items()}
        for key, plot in heatmaps():
            if any(v.get(key) for v in js.values()):
                atomic_write_bytes(out / plot.file, P.to_png(P.layer_module_heatmaps(js, key, plot.title,
                                                                                      cbar_label=plot.cbar, fmt=plot.fmt)))
        if any(v.get("principal_angle_top_by_layer_module") for v in js.values()):
            atomic_write_bytes(out / "angle_curves.png", P.to_png(P.angle_curves(js)))
