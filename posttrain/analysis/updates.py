"""Aggregates of the per-tensor diff table: per layer, per module type, per layer x module cell.

Relative update of a tensor W:   rel(W) = ||W_ft - W_base||_F / ||W_base||_F
A bucket (a layer, a module type, or a layer x module cell) aggregates its tensors as one
concatenated weight:   rel(bucket) = sqrt(sum ||dW||_F^2) / sqrt(sum ||W_base||_F^2).
Update sparsity aggregates the same way (entries changed / entries in the bucket). Spectral
metrics (principal angles, singular-value changes, ranks, ESD alpha) are per matrix and aggregate
as unweighted means over the bucket's 2-D weights. The cosine of two updates dW_a, dW_b over a
bucket is sum <dW_a, dW_b> / sqrt(sum ||dW_a||^2 * sum ||dW_b||^2).

`relative_updates(base, other)` is the one-model, non-spectral entry point kept for callers of the
first version; `posttrain.analysis.diff.diff` is the full API.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from posttrain.analysis.checkpoints import MODULE_ORDER, Checkpoint, check_compatible


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


@dataclass
class SpectralSummary:
    """Spectral aggregates of one model against the base, over its 2-D weights (unweighted means).

    Angles are in degrees. `principal_angle_top` is the mean principal angle between the base's and
    the model's top-k singular subspaces, averaged over the left and right sides and over matrices;
    `sv_rel_change_top` the mean |s_t,i - s_b,i| / s_b,i over the top-k singular values and matrices.
    `angle_curve` = {"x": normalised singular index of each spectrum range (0 = top, 1 = bottom),
    "left": [...], "right": [...]} (mean angle per range). `spectra` holds the singular values of a
    few chosen matrices: {name: {"index": [...], "base": [...], "ft": [...], "rel_change": [...]}}.
    """

    principal_angle_top: float
    principal_angle_top_left: float
    principal_angle_top_right: float
    principal_angle_bottom: float
    sv_rel_change_top: float
    sv_rel_change_bottom: float
    energy_rotation: float
    principal_angle_top_by_module: dict[str, float]
    principal_angle_top_by_layer: list[float | None]
    principal_angle_top_by_layer_module: dict[str, list[float | None]]
    principal_angle_bottom_by_module: dict[str, float]
    sv_rel_change_top_by_module: dict[str, float]
    sv_rel_change_top_by_layer: list[float | None]
    sv_rel_change_top_by_layer_module: dict[str, list[float | None]]
    energy_rotation_by_module: dict[str, float]
    effective_rank_delta_by_module: dict[str, float]
    stable_rank_delta_by_module: dict[str, float]
    alpha_by_layer: list[float | None]
    alpha_base_by_layer: list[float | None]
    alpha_by_module: dict[str, float]
    alpha_base_by_module: dict[str, float]
    angle_curve: dict[str, list[float]]
    spectra: dict[str, dict[str, list[float]]]
    n_matrices: int

    def to_json(self) -> dict:
        return _clean(self.__dict__.copy())


@dataclass
class UpdateSummary:
    """How one fine-tuned checkpoint differs from the base (the per-model entry of diff.json)."""

    rel_update_total: float
    rel_update_by_module: dict[str, float]
    rel_update_by_layer: list[float]
    rel_update_by_layer_module: dict[str, list[float | None]]  # module -> per-layer values
    n_tensors: int
    nonfinite: list[str] = field(default_factory=list)
    changed_frac: float = float("nan")
    unchanged_frac: float = float("nan")
    changed_frac_by_module: dict[str, float] = field(default_factory=dict)
    unchanged_frac_by_module: dict[str, float] = field(default_factory=dict)
    spectral: SpectralSummary | None = None

    def to_json(self) -> dict:
        """Today's keys plus sparsity, and with a spectral diff the `SpectralSummary` keys at top level."""
        out = {k: v for k, v in self.__dict__.items() if k != "spectral"}
        for k in ("changed_frac", "unchanged_frac", "changed_frac_by_module", "unchanged_frac_by_module"):
            out[k] = _clean(out[k])
        if self.spectral is not None:
            out.update(self.spectral.to_json())
        return out


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


def _layers(df: pd.DataFrame) -> list[int]:
    return sorted({int(x) for x in df["layer"].dropna()})


def _n_layers(df: pd.DataFrame, n_layers: int | None) -> int:
    if n_layers is not None:
        return n_layers
    ls = _layers(df)
    return max(ls) + 1 if ls else 0


def _modules(df: pd.DataFrame) -> list[str]:
    present = set(df["module"])
    return [m for m in MODULE_ORDER if m in present] + sorted(present - set(MODULE_ORDER))


class _Ratio:
    """Per-bucket sums of a numerator and a denominator; value = f(num, den)."""

    def __init__(self, f: Callable[[float, float], float]) -> None:
        self.num: dict[object, float] = defaultdict(float)
        self.den: dict[object, float] = defaultdict(float)
        self.f = f

    def add(self, keys: Iterable[object], num: float, den: float) -> None:
        for k in keys:
            self.num[k] += num
            self.den[k] += den

    def get(self, key: object) -> float:
        return self.f(self.num.get(key, 0.0), self.den[key]) if key in self.den else float("nan")


def _keys(r) -> list[object]:
    keys: list[object] = ["total", ("module", r.module)]
    if r.layer is not None and not pd.isna(r.layer):
        keys += [("layer", int(r.layer)), ("cell", int(r.layer), r.module)]
    return keys


def _sqrt_ratio(num: float, den: float) -> float:
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def _cells(get: Callable[[object], float], has: Callable[[object], bool], modules: list[str], n: int) -> dict:
    return {m: [get(("cell", i, m)) if has(("cell", i, m)) else None for i in range(n)]
            for m in modules if any(has(("cell", i, m)) for i in range(n))}


def summarise(rows: pd.DataFrame, n_layers: int | None = None, spectra_for: list[str] | None = None,
              curves: pd.DataFrame | None = None, spectra: pd.DataFrame | None = None) -> UpdateSummary:
    """Aggregate one model's per-tensor rows (see `scan`) into an `UpdateSummary`."""
    good = rows[rows["finite"]]
    n = _n_layers(good, n_layers)
    modules = _modules(good)
    rel = _Ratio(_sqrt_ratio)
    chg, unch = _Ratio(_ratio), _Ratio(_ratio)
    has_sparsity = "changed_frac" in good.columns
    for r in good.itertuples():
        keys = _keys(r)
        rel.add(keys, r.delta_norm**2, r.base_norm**2)
        if has_sparsity:
            chg.add(keys, r.changed_frac * r.numel, r.numel)
            unch.add(keys, r.unchanged_frac * r.numel, r.numel)
    cells = _cells(rel.get, lambda k: k in rel.den, modules, n)
    summary = UpdateSummary(
        rel_update_total=rel.get("total"),
        rel_update_by_module={m: rel.get(("module", m)) for m in modules},
        rel_update_by_layer=[rel.get(("layer", i)) for i in range(n)],
        rel_update_by_layer_module=cells,
        n_tensors=len(rows),
        nonfinite=rows.loc[~rows["finite"], "name"].tolist(),
    )
    if has_sparsity:
        summary.changed_frac = chg.get("total")
        summary.unchanged_frac = unch.get("total")
        summary.changed_frac_by_module = {m: chg.get(("module", m)) for m in modules}
        summary.unchanged_frac_by_module = {m: unch.get(("module", m)) for m in modules}
    if "svd" in rows.columns and (rows["svd"] != "").any():
        summary.spectral = summarise_spectral(good[good["svd"] != ""], n, spectra_for, curves, spectra)
    return summary


def _mean_by(df: pd.DataFrame, col: str, by: str) -> dict:
    s = df[[by, col]].dropna()
    return {k: float(v) for k, v in s.groupby(by, sort=False)[col].mean().items()}


def summarise_spectral(mat: pd.DataFrame, n_layers: int, spectra_for: list[str] | None = None,
                       curves: pd.DataFrame | None = None, spectra: pd.DataFrame | None = None) -> SpectralSummary:
    """Unweighted means of the per-matrix spectral columns over matrices, modules, layers and cells."""
    mat = mat.copy()
    mat["angle_top"] = mat[["angle_top_left", "angle_top_right"]].mean(axis=1, skipna=False)
    mat["angle_bottom"] = mat[["angle_bottom_left", "angle_bottom_right"]].mean(axis=1, skipna=False)
    modules = _modules(mat)
    order = {m: i for i, m in enumerate(modules)}

    def by_module(col: str) -> dict[str, float]:
        d = _mean_by(mat, col, "module")
        return {m: d[m] for m in sorted(d, key=order.get)}

    def by_layer(col: str) -> list[float | None]:
        d = _mean_by(mat.dropna(subset=["layer"]).astype({"layer": int}), col, "layer")
        return [d.get(i) for i in range(n_layers)]

    def by_cell(col: str) -> dict[str, list[float | None]]:
        sub = mat.dropna(subset=["layer", col])
        g = sub.astype({"layer": int}).groupby(["module", "layer"])[col].mean()
        out = {}
        for m in modules:
            if m in g.index.get_level_values(0):
                vals = g.loc[m]
                out[m] = [float(vals[i]) if i in vals.index else None for i in range(n_layers)]
        return out

    def mean(col: str) -> float:
        x = mat[col].dropna()
        return float(x.mean()) if len(x) else float("nan")

    return SpectralSummary(
        principal_angle_top=mean("angle_top"),
        principal_angle_top_left=mean("angle_top_left"),
        principal_angle_top_right=mean("angle_top_right"),
        principal_angle_bottom=mean("angle_bottom"),
        sv_rel_change_top=mean("sv_rel_change_top"),
        sv_rel_change_bottom=mean("sv_rel_change_bottom"),
        energy_rotation=mean("energy_rotation"),
        principal_angle_top_by_module=by_module("angle_top"),
        principal_angle_top_by_layer=by_layer("angle_top"),
        principal_angle_top_by_layer_module=by_cell("angle_top"),
        principal_angle_bottom_by_module=by_module("angle_bottom"),
        sv_rel_change_top_by_module=by_module("sv_rel_change_top"),
        sv_rel_change_top_by_layer=by_layer("sv_rel_change_top"),
        sv_rel_change_top_by_layer_module=by_cell("sv_rel_change_top"),
        energy_rotation_by_module=by_module("energy_rotation"),
        effective_rank_delta_by_module=by_module("effective_rank_delta"),
        stable_rank_delta_by_module=by_module("stable_rank_delta"),
        alpha_by_layer=by_layer("alpha_ft"),
        alpha_base_by_layer=by_layer("alpha_base"),
        alpha_by_module=by_module("alpha_ft"),
        alpha_base_by_module=by_module("alpha_base"),
        angle_curve=mean_angle_curve(curves) if curves is not None else {"x": [], "left": [], "right": []},
        spectra=chosen_spectra(spectra, spectra_for) if spectra is not None else {},
        n_matrices=len(mat),
    )


CURVE_POINTS = 20


def mean_angle_curve(curves: pd.DataFrame, points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """Mean principal angle (degrees) against the normalised singular index, one curve per side.

    Each matrix's curve is resampled (linear interpolation) at `points` evenly spaced positions so
    matrices of different sizes average position by position.
    """
    x = [(i + 0.5) / points for i in range(points)]
    out: dict[str, list[float]] = {"x": x, "left": [], "right": []}
    if curves is None or curves.empty:
        return out
    for side in ("left", "right"):
        sub = curves[curves["side"] == side]
        acc = np.zeros(points)
        count = 0
        for _, g in sub.groupby("name", sort=False):
            g = g.sort_values("x")
            acc += np.interp(x, g["x"].to_numpy(), g["angle"].to_numpy())
            count += 1
        out[side] = (acc / count).tolist() if count else []
    return out


SPECTRUM_POINTS = 256


def chosen_spectra(spectra: pd.DataFrame, names: list[str] | None = None,
                   points: int = SPECTRUM_POINTS) -> dict[str, dict[str, list[float]]]:
    """Singular values before/after of the matrices `names` (default: `default_spectra_names`),
    thinned to at most `points` indices (top and bottom always kept)."""
    if spectra is None or spectra.empty:
        return {}
    if names is None:
        names = default_spectra_names(spectra)
    out = {}
    for r in spectra[spectra["name"].isin(names)].itertuples():
        sb, st = np.asarray(r.sv_base), np.asarray(r.sv_ft)
        idx = np.unique(np.round(np.linspace(0, len(sb) - 1, min(points, len(sb)))).astype(int))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(sb[idx] > 0, (st[idx] - sb[idx]) / sb[idx], np.nan)
        out[r.name] = {"index": idx.tolist(), "base": sb[idx].tolist(), "ft": st[idx].tolist(),
                       "rel_change": rel.tolist()}
    return out


def default_spectra_names(spectra: pd.DataFrame, modules: tuple[str, ...] = ("q_proj", "down_proj")) -> list[str]:
    """First, middle and last layer of two module types (q_proj and down_proj when present)."""
    df = spectra.dropna(subset=["layer"])
    present = [m for m in modules if m in set(df["module"])]
    if not present:
        present = list(dict.fromkeys(df["module"]))[:2]
    names = []
    for m in present:
        sub = df[df["module"] == m].sort_values("layer")
        if sub.empty:
            continue
        layers = sorted(set(sub["layer"].astype(int)))
        for layer in dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]):
            names.append(sub[sub["layer"].astype(int) == layer]["name"].iloc[0])
    return names


def summarise_pair(rows: pd.DataFrame, a: str, b: str, n_layers: int | None = None) -> PairSummary:
    """Aggregate per-tensor <dW_a, dW_b> rows (see `scan`) into cosines and distances per bucket."""
    good = rows.dropna(subset=["dot"])
    n = _n_layers(good, n_layers)
    modules = _modules(good)
    dot, sa, sb, dist, base = (defaultdict(float) for _ in range(5))
    for r in good.itertuples():
        for k in _keys(r):
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


# ------------------------------------------------------------------------------------------------
# the first version's entry points (one model, element-wise statistics only)


def tensor_rows(base: Checkpoint, other: Checkpoint, names: list[str], device: str = "cpu",
                progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """One row per tensor: name, layer, module, shape, norms, relative update, sparsity, finiteness."""
    from posttrain.analysis.scan import DiffOptions, scan

    res = scan(base, {"_": other}, names, DiffOptions(device=device), progress=progress)
    return pd.DataFrame(res.rows["_"])


def relative_updates(base: str | Path | Checkpoint, other: str | Path | Checkpoint, device: str = "cpu",
                     progress: Callable[[int], None] | None = None) -> tuple[UpdateSummary, pd.DataFrame]:
    b = base if isinstance(base, Checkpoint) else Checkpoint(base)
    o = other if isinstance(other, Checkpoint) else Checkpoint(other)
    names = check_compatible(b, o)
    rows = tensor_rows(b, o, names, device, progress)
    return summarise(rows), rows
