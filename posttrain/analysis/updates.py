"""Aggregates of the per-tensor diff table: per layer, per module type, per layer x module cell.

Which aggregates exist and how each is computed is declared in `posttrain.analysis.diagnostics`
(relative update ||dW||_F / ||W_base||_F with a bucket as one concatenated weight, update sparsity
weighted by entries, per-matrix spectral metrics as unweighted means over the bucket's 2-D
weights); `summarise` applies that table to one model's per-tensor rows. The cosine of two updates
dW_a, dW_b over a bucket is sum <dW_a, dW_b> / sqrt(sum ||dW_a||^2 * sum ||dW_b||^2).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from posttrain.analysis.diagnostics import SummaryInputs, bucket_keys, modules_of, summarise_rows


def _clean(x):
    """JSON-safe: nan/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class ModelSummary:
    """How one fine-tuned checkpoint differs from the base: every aggregate of the diagnostics table
    (the per-model entry of diff.json) plus `n_tensors`, `nonfinite` (tensors skipped for non-finite
    values) and `n_matrices` (2-D weights a spectral pass analysed). Keys read as attributes too
    (`s.rel_update_total`)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @property
    def has_spectral(self) -> bool:
        """Whether singular values (and maybe vectors) were analysed for this model."""
        return self.values.get("n_matrices", 0) > 0

    def to_json(self) -> dict:
        return _clean(self.values)


@dataclass
class PairSummary:
    """Cosine of two models' updates (dW_a, dW_b against the same base) and their distance.

    cosine = <dW_a, dW_b> / (||dW_a|| ||dW_b||) per bucket as one concatenated weight;
    rel_distance = ||dW_a - dW_b||_F / ||W_base||_F = ||W_a - W_b||_F / ||W_base||_F.
    """

    a: str
    b: str
    cosine_total: float
    cosine_by_module: dict[str, float]
    cosine_by_layer: list[float | None]
    cosine_by_layer_module: dict[str, list[float | None]]
    rel_distance_total: float
    rel_distance_by_module: dict[str, float]

    def to_json(self) -> dict:
        return _clean(self.__dict__.copy())


# ------------------------------------------------------------------------------------------------


def _n_layers(df: pd.DataFrame, n_layers: int | None) -> int:
    if n_layers is not None:
        return n_layers
    ls = {int(x) for x in df["layer"].dropna()}
    return max(ls) + 1 if ls else 0


def summarise(rows: pd.DataFrame, n_layers: int | None = None, spectra_for: list[str] | None = None,
              curves: pd.DataFrame | None = None, spectra: pd.DataFrame | None = None) -> ModelSummary:
    """Aggregate one model's per-tensor rows (see `scan`) by the diagnostics table."""
    good = rows[rows["finite"]]
    n = _n_layers(good, n_layers)
    mat = good[good["svd"] != ""] if "svd" in good.columns else good.iloc[0:0]
    values = summarise_rows(SummaryInputs(good, mat, curves, spectra, n, spectra_for))
    values["n_tensors"] = len(rows)
    values["nonfinite"] = rows.loc[~rows["finite"], "name"].tolist()
    if not mat.empty:
        values["n_matrices"] = len(mat)
    return ModelSummary(values)


def _cells(get: Callable[[object], float], has: Callable[[object], bool], modules: list[str], n: int) -> dict:
    return {m: [get(("cell", i, m)) if has(("cell", i, m)) else None for i in range(n)]
            for m in modules if any(has(("cell", i, m)) for i in range(n))}


def _sqrt_ratio(num: float, den: float) -> float:
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


def summarise_pair(rows: pd.DataFrame, a: str, b: str, n_layers: int | None = None) -> PairSummary:
    """Aggregate per-tensor <dW_a, dW_b> rows (see `scan`) into cosines and distances per bucket."""
    good = rows.dropna(subset=["dot"])
    n = _n_layers(good, n_layers)
    modules = modules_of(good)
    dot, sa, sb, dist, base = (defaultdict(float) for _ in range(5))
    for r in good.itertuples():
        for k in bucket_keys(r):
            dot[k] += r.dot
            sa[k] += r.sq_a
            sb[k] += r.sq_b
            dist[k] += r.dist_sq
            base[k] += r.base_sq

    def cos(k) -> float:
        den = math.sqrt(sa.get(k, 0.0) * sb.get(k, 0.0))
        return dot[k] / den if den > 0 else float("nan")

    def rd(k) -> float:
        return _sqrt_ratio(dist.get(k, 0.0), base.get(k, 0.0))

    return PairSummary(
        a=a, b=b, cosine_total=cos("total"),
        cosine_by_module={m: cos(("module", m)) for m in modules},
        cosine_by_layer=[cos(("layer", i)) if ("layer", i) in base else None for i in range(n)],
        cosine_by_layer_module=_cells(cos, lambda k: k in base, modules, n),
        rel_distance_total=rd("total"),
        rel_distance_by_module={m: rd(("module", m)) for m in modules},
    )
