"""Relative update norms between a base checkpoint and fine-tuned ones, streamed tensor by tensor.

For a tensor W:   rel(W) = ||W_ft - W_base||_F / ||W_base||_F
A bucket (a layer, a module type, or a layer x module cell) aggregates its tensors as one
concatenated weight:   rel(bucket) = sqrt(sum ||dW||_F^2) / sqrt(sum ||W_base||_F^2).
Only one tensor pair is resident at a time; norms accumulate in float64.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from posttrain.analysis.checkpoints import MODULE_ORDER, Checkpoint, check_compatible, classify


@dataclass
class UpdateSummary:
    """Relative updates of one fine-tuned checkpoint against the base."""

    rel_update_total: float
    rel_update_by_module: dict[str, float]
    rel_update_by_layer: list[float]
    rel_update_by_layer_module: dict[str, list[float | None]]  # module -> per-layer values
    n_tensors: int
    nonfinite: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__.copy()


class _Acc:
    """Sums of squared norms per bucket."""

    def __init__(self) -> None:
        self.delta: dict[object, float] = defaultdict(float)
        self.base: dict[object, float] = defaultdict(float)

    def add(self, key: object, delta_sq: float, base_sq: float) -> None:
        self.delta[key] += delta_sq
        self.base[key] += base_sq

    def rel(self, key: object) -> float:
        b = self.base.get(key, 0.0)
        return math.sqrt(self.delta.get(key, 0.0)) / math.sqrt(b) if b > 0 else float("nan")


def tensor_rows(base: Checkpoint, other: Checkpoint, names: list[str], device: str = "cpu",
                progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """One row per tensor: name, layer, module, shape, squared norms, relative update, finiteness."""
    rows = []
    for i, name in enumerate(names):
        info = classify(name)
        wb = base.get(name).to(device=device, dtype=torch.float64)
        wt = other.get(name).to(device=device, dtype=torch.float64)
        finite = bool(torch.isfinite(wb).all() and torch.isfinite(wt).all())
        d_sq = float((wt - wb).pow(2).sum()) if finite else float("nan")
        b_sq = float(wb.pow(2).sum()) if finite else float("nan")
        rows.append({
            "name": name, "layer": info.layer, "module": info.module, "shape": "x".join(map(str, wb.shape)),
            "numel": wb.numel(), "ndim": wb.dim(), "base_norm": math.sqrt(b_sq) if finite else float("nan"),
            "delta_norm": math.sqrt(d_sq) if finite else float("nan"),
            "rel_update": math.sqrt(d_sq / b_sq) if finite and b_sq > 0 else float("nan"), "finite": finite,
        })
        del wb, wt
        if progress:
            progress(i + 1)
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame, n_layers: int | None = None) -> UpdateSummary:
    """Aggregate per-tensor rows into per-module, per-layer and per-cell relative updates."""
    acc = _Acc()
    good = rows[rows["finite"]]
    for r in good.itertuples():
        d2, b2 = r.delta_norm**2, r.base_norm**2
        acc.add("total", d2, b2)
        acc.add(("module", r.module), d2, b2)
        if r.layer is not None and not pd.isna(r.layer):
            layer = int(r.layer)
            acc.add(("layer", layer), d2, b2)
            acc.add(("cell", layer, r.module), d2, b2)
    layers = sorted({int(x) for x in good["layer"].dropna()})
    n = n_layers if n_layers is not None else (max(layers) + 1 if layers else 0)
    modules = [m for m in MODULE_ORDER if ("module", m) in acc.base]
    cells = {m: [acc.rel(("cell", i, m)) if ("cell", i, m) in acc.base else None for i in range(n)]
             for m in modules if any(("cell", i, m) in acc.base for i in range(n))}
    return UpdateSummary(
        rel_update_total=acc.rel("total"),
        rel_update_by_module={m: acc.rel(("module", m)) for m in modules},
        rel_update_by_layer=[acc.rel(("layer", i)) for i in range(n)],
        rel_update_by_layer_module=cells,
        n_tensors=len(rows),
        nonfinite=rows.loc[~rows["finite"], "name"].tolist(),
    )


def relative_updates(base: str | Path | Checkpoint, other: str | Path | Checkpoint, device: str = "cpu",
                     progress: Callable[[int], None] | None = None) -> tuple[UpdateSummary, pd.DataFrame]:
    b = base if isinstance(base, Checkpoint) else Checkpoint(base)
    o = other if isinstance(other, Checkpoint) else Checkpoint(other)
    names = check_compatible(b, o)
    rows = tensor_rows(b, o, names, device, progress)
    return summarise(rows), rows
