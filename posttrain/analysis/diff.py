"""`posttrain diff`: compare fine-tuned checkpoints with a base, write tables, JSON and plots.

Python API:  `diff(base, {"sft": path, ...}, out_dir)` returns a `DiffResult` with the summaries
and per-tensor pandas tables; the CLI is a thin wrapper around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from posttrain.analysis.checkpoints import Checkpoint, check_compatible
from posttrain.analysis.updates import UpdateSummary, summarise, tensor_rows
from posttrain.errors import UserError
from posttrain.io import atomic_write_json, atomic_write_text
from posttrain.progress import progress_bar


@dataclass
class DiffResult:
    base: str
    summaries: dict[str, UpdateSummary]
    tables: dict[str, pd.DataFrame]

    def to_json(self) -> dict:
        return {"base": self.base, "models": {k: v.to_json() for k, v in self.summaries.items()}}


def model_names(paths: list[str | Path]) -> dict[str, Path]:
    """Short unique display names for checkpoint paths (the last path component that differs)."""
    out: dict[str, Path] = {}
    for p in map(Path, paths):
        parts = [x for x in p.resolve().parts if x not in ("model", "checkpoints")]
        name = parts[-1] if parts else str(p)
        k = 2
        while name in out:
            name = f"{parts[-1]}-{k}"
            k += 1
        out[name] = p
    return out


def diff(base: str | Path, others: dict[str, str | Path], out_dir: str | Path | None = None,
         device: str = "cpu", plots: bool = True, show_progress: bool = True) -> DiffResult:
    """Relative updates of each of `others` against `base`; files go to `out_dir` when given."""
    if not others:
        raise UserError("diff needs at least one checkpoint to compare with the base")
    b = Checkpoint(base)
    cks = {name: Checkpoint(p) for name, p in others.items()}
    names = {name: check_compatible(b, ck) for name, ck in cks.items()}  # fail before any work
    summaries, tables = {}, {}
    with progress_bar(sum(len(v) for v in names.values()), "diff", enabled=show_progress) as advance:
        for name, ck in cks.items():
            rows = tensor_rows(b, ck, names[name], device, progress=lambda _i: advance(1))
            rows.insert(0, "model", name)
            tables[name] = rows
            summaries[name] = summarise(rows)
    result = DiffResult(str(base), summaries, tables)
    if out_dir is not None:
        write_outputs(result, Path(out_dir), plots)
    return result


def write_outputs(result: DiffResult, out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(result.tables.values(), ignore_index=True)
    atomic_write_text(out / "tensors.csv", table.to_csv(index=False))
    tmp = out / ".tensors.parquet.tmp"
    table.to_parquet(tmp, index=False)
    tmp.replace(out / "tensors.parquet")
    atomic_write_json(out / "diff.json", result.to_json())
    if plots:
        from posttrain.report import plots as P

        js = {k: v.to_json() for k, v in result.summaries.items()}
        P.to_png(P.update_heatmaps(js), out / "rel_update_heatmap.png")
        P.to_png(P.module_bars(js), out / "rel_update_by_module.png")
