"""The table of weight diagnostics: every metric is declared here once.

A `Diagnostic` names the per-tensor columns one function computes for each 2-D weight pair (or,
with no function, columns of the streamed element-wise pass in `scan`), and its `Aggregate`s say
how a column aggregates over the tensors of a bucket (the whole model, a module type, a layer, a
layer x module cell), which aggregates enter a diff's per-model summary (diff.json), results.json
and the trajectory points, and whether the report and `posttrain diff` draw a layer x module
heatmap of it. `scan` (the per-tensor table), `summarise` (diff.json), `results.assemble_results`,
`trajectory.trajectory_points` and the plots are generated from `DIAGNOSTICS`, so a new diagnostic
is one `register` call plus its function::

    def frobenius_ratio(m: MatrixPair) -> dict[str, float]:       # m: see tensor_metrics.MatrixPair
        return {"sv_top_ratio": float(m.ft.S[0] / m.fb.S[0])}

    register(Diagnostic("sv_top_ratio", frobenius_ratio, columns=("sv_top_ratio",), needs="values",
                        aggregates=(Aggregate("sv_top_ratio", results=("total", "module")),)))

Summary keys of an aggregate `a`: "total" -> `a.total_key or a.key`, "module" -> `<key>_by_module`,
"layer" -> `<key>_by_layer` (a list over layers), "cell" -> `<key>_by_layer_module` ({module:
per-layer list}). Aggregation (`how`):

- "norm_ratio" (columns num, den): sqrt(sum num^2) / sqrt(sum den^2) over the bucket, i.e. the
  bucket as one concatenated weight (the relative update);
- "numel_weighted": sum(value * numel) / sum(numel) (shares of entries, e.g. update sparsity);
- "sum_sq": sum of the squared column over the bucket (e.g. the update energy sum ||dW||_F^2);
- "mean": the unweighted mean over the bucket's matrices (per-matrix spectral metrics);
- a function of `SummaryInputs` for whole-table summaries (the angle curve, chosen spectra).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from posttrain.analysis import tensor_metrics as tm
from posttrain.analysis.checkpoints import MODULE_ORDER

SCOPES = ("total", "module", "layer", "cell")


@dataclass(frozen=True)
class Plot:
    """A layer x module heatmap of an aggregate's "cell" values, one panel per model."""

    title: str
    file: str  # PNG name in `posttrain diff` outputs
    fmt: str = "{:.3f}"
    cbar: str = ""


@dataclass(frozen=True)
class SummaryInputs:
    """What whole-table aggregates see: one model's rows and its side tables (may be empty)."""

    rows: pd.DataFrame  # the model's per-tensor rows, finite tensors only
    matrices: pd.DataFrame  # the rows of the matrices a per-matrix pass analysed
    curves: pd.DataFrame | None
    spectra: pd.DataFrame | None
    n_layers: int
    spectra_for: list[str] | None


@dataclass(frozen=True)
class Aggregate:
    key: str
    value: str | Callable[[pd.DataFrame], pd.Series] | tuple[str, str] | None = None  # default: column `key`
    how: str | Callable[[SummaryInputs], Any] = "mean"
    scopes: tuple[str, ...] = ("total",)
    results: tuple[str, ...] = ()  # scopes copied into results.json
    trajectory: tuple[str, ...] = ()  # "total", and "module" as "<key>/<module>" entries of each point
    total_key: str | None = None
    plot: Plot | None = None

    def summary_key(self, scope: str) -> str:
        if scope == "total" or callable(self.how):
            return self.total_key or self.key
        return {"module": f"{self.key}_by_module", "layer": f"{self.key}_by_layer",
                "cell": f"{self.key}_by_layer_module"}[scope]


@dataclass(frozen=True)
class Diagnostic:
    """One per-matrix metric function (or, with `compute=None`, columns of the streamed pass).

    `needs`: "stream" (computed for every tensor while streaming), "values" (runs whenever singular
    values are computed: `--esd` or `--spectral`), "vectors" (needs singular vectors: `--spectral`).
    """

    name: str
    compute: Callable[[tm.MatrixPair], dict[str, float]] | None
    columns: tuple[str, ...] = ()
    needs: str = "vectors"
    aggregates: tuple[Aggregate, ...] = field(default_factory=tuple)


DIAGNOSTICS: dict[str, Diagnostic] = {}


def register(d: Diagnostic) -> Diagnostic:
    """Add `d` to the table; names, columns and summary keys must be new."""
    if d.name in DIAGNOSTICS:
        raise ValueError(f"diagnostic {d.name!r} registered twice")
    if d.needs not in ("stream", "values", "vectors"):
        raise ValueError(f"diagnostic {d.name!r}: needs must be stream, values or vectors, not {d.needs!r}")
    taken_cols = set(matrix_columns()) | set(stream_columns())
    taken_keys = {a.summary_key(s) for x in DIAGNOSTICS.values() for a in x.aggregates for s in a.scopes}
    if d.compute is not None and (clash := set(d.columns) & taken_cols):
        raise ValueError(f"diagnostic {d.name!r}: columns {sorted(clash)} already exist")
    for a in d.aggregates:
        for s in a.scopes:
            if s not in SCOPES:
                raise ValueError(f"diagnostic {d.name!r}: unknown scope {s!r} (known: {', '.join(SCOPES)})")
            if a.summary_key(s) in taken_keys:
                raise ValueError(f"diagnostic {d.name!r}: summary key {a.summary_key(s)!r} already exists")
        if not set(a.results) <= set(a.scopes) or not set(a.trajectory) <= set(a.scopes):
            raise ValueError(f"diagnostic {d.name!r}: results/trajectory scopes must be among its scopes")
    DIAGNOSTICS[d.name] = d
    return d


def unregister(name: str) -> None:
    """Remove a diagnostic (tests that register toy entries clean up with this)."""
    DIAGNOSTICS.pop(name, None)


def matrix_diagnostics(vectors: bool) -> list[Diagnostic]:
    """The per-matrix diagnostics to run when singular vectors are (or are not) available."""
    wanted = ("values", "vectors") if vectors else ("values",)
    return [d for d in DIAGNOSTICS.values() if d.compute is not None and d.needs in wanted]


def stream_columns() -> list[str]:
    """The columns the streamed element-wise pass of `scan` computes for every tensor."""
    return [c for d in DIAGNOSTICS.values() if d.needs == "stream" for c in d.columns]


def matrix_columns() -> list[str]:
    """Every per-matrix column, in table order ("k" first): the spectral part of each tensor row."""
    cols = ["k"]
    for d in DIAGNOSTICS.values():
        if d.compute is not None:
            cols += [c for c in d.columns if c not in cols]
    return cols


def results_keys() -> list[str]:
    """The per-model summary keys that results.json keeps (the per-tensor tables stay in diagnostics/diff/)."""
    return [a.summary_key(s) for d in DIAGNOSTICS.values() for a in d.aggregates for s in a.scopes if s in a.results]


def trajectory_values(summary: dict) -> dict[str, Any]:
    """The entries of one checkpoint's summary that a trajectory point carries."""
    out: dict[str, Any] = {}
    for d in DIAGNOSTICS.values():
        for a in d.aggregates:
            if "total" in a.trajectory and a.summary_key("total") in summary:
                out[a.summary_key("total")] = summary[a.summary_key("total")]
            if "module" in a.trajectory:
                for m, v in (summary.get(a.summary_key("module")) or {}).items():
                    out[f"{a.key}/{m}"] = v
    return out


def heatmaps() -> list[tuple[str, Plot]]:
    """(cell summary key, plot) of every aggregate drawn as a layer x module heatmap."""
    return [(a.summary_key("cell"), a.plot) for d in DIAGNOSTICS.values() for a in d.aggregates
            if a.plot is not None and "cell" in a.scopes]


# ------------------------------------------------------------------------------------------------
# aggregation


def modules_of(df: pd.DataFrame) -> list[str]:
    present = set(df["module"])
    return [m for m in MODULE_ORDER if m in present] + sorted(present - set(MODULE_ORDER))


def bucket_keys(r) -> list[object]:
    keys: list[object] = ["total", ("module", r.module)]
    if r.layer is not None and not pd.isna(r.layer):
        keys += [("layer", int(r.layer)), ("cell", int(r.layer), r.module)]
    return keys


def _ratio_sums(df: pd.DataFrame, num: Callable, den: Callable) -> tuple[dict, dict]:
    nums: dict[object, float] = defaultdict(float)
    dens: dict[object, float] = defaultdict(float)
    for r in df.itertuples():
        n, d = num(r), den(r)
        for k in bucket_keys(r):
            nums[k] += n
            dens[k] += d
    return nums, dens


def _bucketed(get: Callable[[object], float], present: Callable[[object], bool], scopes: Iterable[str],
              modules: list[str], n_layers: int, a: Aggregate) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in scopes:
        if s == "total":
            out[a.summary_key(s)] = get("total")
        elif s == "module":
            out[a.summary_key(s)] = {m: get(("module", m)) for m in modules}
        elif s == "layer":
            out[a.summary_key(s)] = [get(("layer", i)) for i in range(n_layers)]
        else:
            out[a.summary_key(s)] = {m: [get(("cell", i, m)) if present(("cell", i, m)) else None for i in range(n_layers)]
                                     for m in modules if any(present(("cell", i, m)) for i in range(n_layers))}
    return out


def _ratio_aggregate(rows: pd.DataFrame, a: Aggregate, n_layers: int) -> dict[str, Any]:
    if a.how == "norm_ratio":
        num_col, den_col = a.value
        nums, dens = _ratio_sums(rows, lambda r: getattr(r, num_col) ** 2, lambda r: getattr(r, den_col) ** 2)

        def f(n: float, d: float) -> float:
            return math.sqrt(n) / math.sqrt(d) if d > 0 else float("nan")
    elif a.how == "sum_sq":
        col = a.value or a.key
        nums, dens = _ratio_sums(rows, lambda r: getattr(r, col) ** 2, lambda r: 1.0)

        def f(n: float, d: float) -> float:
            return n
    else:
        col = a.value or a.key
        nums, dens = _ratio_sums(rows, lambda r: getattr(r, col) * r.numel, lambda r: r.numel)

        def f(n: float, d: float) -> float:
            return n / d if d > 0 else float("nan")

    def get(k: object) -> float:
        return f(nums[k], dens[k]) if k in dens else float("nan")

    return _bucketed(get, lambda k: k in dens, a.scopes, modules_of(rows), n_layers, a)


def _mean_aggregate(mat: pd.DataFrame, a: Aggregate, n_layers: int) -> dict[str, Any]:
    value = a.value or a.key
    col = mat[value] if isinstance(value, str) else value(mat)
    df = pd.DataFrame({"module": mat["module"], "layer": mat["layer"], "v": col})
    modules = modules_of(mat)
    order = {m: i for i, m in enumerate(modules)}
    out: dict[str, Any] = {}
    for s in a.scopes:
        key = a.summary_key(s)
        if s == "total":
            out[key] = float(df["v"].dropna().mean())  # nan when no matrix has a value
        elif s == "module":
            d = {k: float(v) for k, v in df[["module", "v"]].dropna().groupby("module", sort=False)["v"].mean().items()}
            out[key] = {m: d[m] for m in sorted(d, key=order.get)}
        elif s == "layer":
            sub = df.dropna(subset=["layer"]).astype({"layer": int})[["layer", "v"]].dropna()
            d = {k: float(v) for k, v in sub.groupby("layer", sort=False)["v"].mean().items()}
            out[key] = [d.get(i) for i in range(n_layers)]
        else:
            g = df.dropna(subset=["layer", "v"]).astype({"layer": int}).groupby(["module", "layer"])["v"].mean()
            cells = {}
            for m in modules:
                if m in g.index.get_level_values(0):
                    vals = g.loc[m]
                    cells[m] = [float(vals[i]) if i in vals.index else None for i in range(n_layers)]
            out[key] = cells
    return out


def summarise_rows(inputs: SummaryInputs) -> dict[str, Any]:
    """Every declared aggregate of one model (the per-model entry of diff.json, before JSON cleaning)."""
    out: dict[str, Any] = {}
    has_matrices = not inputs.matrices.empty
    for d in DIAGNOSTICS.values():
        for a in d.aggregates:
            if callable(a.how):
                if has_matrices:
                    out[a.summary_key("total")] = a.how(inputs)
            elif a.how == "mean":
                if has_matrices:
                    out.update(_mean_aggregate(inputs.matrices, a, inputs.n_layers))
            elif d.needs == "stream" or has_matrices:
                needed = a.value if isinstance(a.value, tuple) else (a.value or a.key,)
                if all(c in inputs.rows.columns for c in needed):
                    out.update(_ratio_aggregate(inputs.rows, a, inputs.n_layers))
    return out


# ------------------------------------------------------------------------------------------------
# whole-table summaries: the angle curve and the chosen spectra

CURVE_POINTS = 20
SPECTRUM_POINTS = 256


def mean_angle_curve(curves: pd.DataFrame | None, points: int = CURVE_POINTS) -> dict[str, list[float]]:
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


def chosen_spectra(spectra: pd.DataFrame | None, names: list[str] | None = None,
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
        sub = df[df["module"] == m].sort_values("layer")  # never empty: m is one of df's modules
        layers = sorted(set(sub["layer"].astype(int)))
        for layer in dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]):
            names.append(sub[sub["layer"].astype(int) == layer]["name"].iloc[0])
    return names


def _both_sides(prefix: str) -> Callable[[pd.DataFrame], pd.Series]:
    """Per matrix, the mean of the left and right values (nan when either is missing)."""
    return lambda df: df[[f"{prefix}_left", f"{prefix}_right"]].mean(axis=1, skipna=False)


def _on_null_matrices(value: Callable[[pd.DataFrame], pd.Series]) -> Callable[[pd.DataFrame], pd.Series]:
    """`value` on the matrices that have a random-update null, nan on the others."""
    return lambda df: value(df).where(df["null_angle_top_left"].notna())


def _count(values: pd.Series) -> int:
    """How many matrices have a (non-nan) value."""
    return int(values.notna().sum())


# ------------------------------------------------------------------------------------------------
# the built-in table

_ALL = SCOPES

register(Diagnostic("update_norms", None, columns=("base_norm", "delta_norm", "rel_update"), needs="stream", aggregates=(
    Aggregate("rel_update", value=("delta_norm", "base_norm"), how="norm_ratio", scopes=_ALL,
              results=_ALL, trajectory=("total", "module"), total_key="rel_update_total",
              plot=Plot("relative update ||dW|| / ||W_base|| by layer x module", "rel_update_heatmap.png")),
    # the update energy sum ||dW||_F^2: where a method's update went, as a share of its own total
    Aggregate("update_sq", value="delta_norm", how="sum_sq", scopes=("total", "cell"), results=("total", "cell")),
)))
register(Diagnostic("update_sparsity", None, columns=("changed_frac", "unchanged_frac"), needs="stream", aggregates=(
    Aggregate("changed_frac", how="numel_weighted", scopes=("total", "module"), results=("total",), trajectory=("total",)),
    Aggregate("unchanged_frac", how="numel_weighted", scopes=("total", "module"), results=("total",),
              trajectory=("total",)),
)))
register(Diagnostic("top_subspace_angles", tm.top_subspace_angles, columns=(
    "angle_top_left", "angle_top_right", "angle_top_max_left", "angle_top_max_right", "proj_dist_top_left",
    "proj_dist_top_right", "alignment_top_left", "alignment_top_right"), aggregates=(
    Aggregate("principal_angle_top", value=_both_sides("angle_top"), scopes=_ALL, results=_ALL, trajectory=("total",),
              plot=Plot("principal angle of the top-k singular subspaces (degrees, mean of left and right)",
                        "principal_angle_heatmap.png", fmt="{:.2f}", cbar="degrees")),
    Aggregate("principal_angle_top_left", value="angle_top_left"),
    Aggregate("principal_angle_top_right", value="angle_top_right"),
)))
register(Diagnostic("bottom_subspace_angles", tm.bottom_subspace_angles,
                    columns=("angle_bottom_left", "angle_bottom_right"), aggregates=(
    Aggregate("principal_angle_bottom", value=_both_sides("angle_bottom"), scopes=("total", "module"),
              results=("total", "module"), trajectory=("total",)),
)))
register(Diagnostic("singular_value_changes", tm.singular_value_changes, needs="values",
                    columns=("sv_rel_change_top", "sv_rel_change_bottom", "sv_rel_change_all"), aggregates=(
    Aggregate("sv_rel_change_top", scopes=_ALL, results=("total", "module", "cell"), trajectory=("total",),
              plot=Plot("relative change of the top-k singular values |s_ft - s_base| / s_base", "sv_change_heatmap.png")),
    Aggregate("sv_rel_change_bottom", results=("total",)),
)))
register(Diagnostic("random_update_null", tm.random_update_null, columns=(
    "null_angle_top_left", "null_angle_top_right", "null_sv_rel_change_top",
    *(f"null_{c}_d{d}" for d in range(tm.NULL_DRAWS) for c in ("angle_top_left", "angle_top_right", "sv_rel_change_top"))),
    aggregates=(
        Aggregate("null_principal_angle_top", value=_both_sides("null_angle_top"), scopes=("total", "module"),
                  results=("total", "module")),
        Aggregate("null_sv_rel_change_top", scopes=("total", "module"), results=("total", "module")),
        # the model's own top-k angle and s.v. change over exactly the matrices that have a null, so the
        # comparison is like with like: matrices analysed through their Gram matrix get no null
        Aggregate("null_set_principal_angle_top", value=_on_null_matrices(_both_sides("angle_top")), results=("total",)),
        Aggregate("null_set_sv_rel_change_top", value=_on_null_matrices(lambda df: df["sv_rel_change_top"]),
                  results=("total",)),
        Aggregate("null_set_matrices", how=lambda inp: _count(inp.matrices["null_angle_top_left"]), results=("total",)),
        Aggregate("angle_matrices", how=lambda inp: _count(_both_sides("angle_top")(inp.matrices)), results=("total",)),
        # each draw's model-level numbers: the spread of the null's ratio over draws
        *(a for d in range(tm.NULL_DRAWS) for a in (
            Aggregate(f"null_principal_angle_top_d{d}",
                      value=lambda df, d=d: df[[f"null_angle_top_left_d{d}", f"null_angle_top_right_d{d}"]].mean(
                          axis=1, skipna=False), results=("total",)),
            Aggregate(f"null_sv_rel_change_top_d{d}", results=("total",)))),
    )))
register(Diagnostic("energy_split", tm.energy_split, columns=(
    "energy_magnitude", "energy_rotation", "energy_diag_in_span", "energy_rotation_in_span"), aggregates=(
    Aggregate("energy_rotation", scopes=("total", "module"), results=("total", "module"), trajectory=("total",)),
    Aggregate("energy_magnitude", scopes=("total", "module"), results=("total", "module")),
    Aggregate("energy_rotation_in_span", scopes=("total", "module"), results=("total", "module")),
)))
register(Diagnostic("update_energy_top", tm.update_energy_top, columns=("update_energy_top",)))
register(Diagnostic("update_ranks", tm.update_ranks, columns=("stable_rank_delta", "effective_rank_delta"), aggregates=(
    Aggregate("effective_rank_delta", scopes=("module",), results=("module",)),
    Aggregate("stable_rank_delta", scopes=("module",)),
)))
register(Diagnostic("spectrum_summaries", tm.spectrum_summaries, needs="values", columns=(
    "stable_rank_base", "stable_rank_ft", "alpha_base", "alpha_ft", "alpha_weighted_base", "alpha_weighted_ft",
    "log_spectral_norm_base", "log_spectral_norm_ft"), aggregates=(
    Aggregate("alpha", value="alpha_ft", scopes=("layer", "module"), results=("module",)),
    Aggregate("alpha_base", scopes=("layer", "module"), results=("module",)),
)))
register(Diagnostic("angle_curve", None, needs="vectors", aggregates=(
    Aggregate("angle_curve", how=lambda i: mean_angle_curve(i.curves), scopes=("total",), results=("total",)),
)))
register(Diagnostic("spectra", None, needs="values", aggregates=(
    Aggregate("spectra", how=lambda i: chosen_spectra(i.spectra, i.spectra_for), scopes=("total",), results=("total",)),
)))
