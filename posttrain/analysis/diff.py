"""`posttrain diff`: where and how did fine-tuning change the weights? Tables, JSON and plots.

Python API:

    res = diff("runs/demo/base", {"sft": ".../sft/model", "grpo": ".../grpo/model"}, out_dir, spectral=True)
    res.summaries["sft"].to_json()      # the per-model entry of diff.json / results.json diagnostics
    res.table                           # per-tensor pandas table, all models (also res.tables[name])
    res.pairs[("sft", "grpo")]          # cosine of the two updates per module / layer
    res.curves, res.spectra             # principal-angle curves and singular values per matrix

The CLI is a thin wrapper. Files written to `out_dir` (each atomically; nothing is written unless
the whole diff succeeded): diff.json, tensors.csv/.parquet, pairs.csv/.parquet (with 2+ models),
angle_curves.csv/.parquet and spectra.parquet (with spectral), and PNG plots.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from posttrain.analysis.checkpoints import Checkpoint, check_compatible
from posttrain.analysis.scan import DiffOptions, scan
from posttrain.analysis.updates import ModelSummary, PairSummary, summarise, summarise_pair
from posttrain.errors import UserError
from posttrain.io import atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text
from posttrain.progress import progress_bar

MAX_DEFAULT_PAIRS_MODELS = 6


@dataclass
class DiffResult:
    base: str
    summaries: dict[str, ModelSummary]
    tables: dict[str, pd.DataFrame]
    pairs: dict[tuple[str, str], PairSummary] = field(default_factory=dict)
    pair_tables: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    spectra: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: dict = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        """All models' per-tensor rows in one table (a `model` column tells them apart)."""
        return pd.concat(self.tables.values(), ignore_index=True) if self.tables else pd.DataFrame()

    def subset(self, models: list[str], pairs: list[tuple[str, str]] | None = None) -> "DiffResult":
        """The same diff restricted to `models` and to `pairs` (default: every computed pair of them)."""
        keep = set(models)
        if pairs is None:
            pairs = [p for p in self.pairs if keep.issuperset(p)]

        def rows(df: pd.DataFrame) -> pd.DataFrame:
            return df[df["model"].isin(keep)].reset_index(drop=True) if not df.empty else df

        return DiffResult(self.base, {m: self.summaries[m] for m in models}, {m: self.tables[m] for m in models},
                          {p: self.pairs[p] for p in pairs}, {p: self.pair_tables[p] for p in pairs},
                          rows(self.curves), rows(self.spectra), dict(self.settings))

    def to_json(self) -> dict:
        out = {"base": self.base, "models": {k: v.to_json() for k, v in self.summaries.items()}}
        if self.pairs:
            out["pairs"] = {f"{a}|{b}": p.to_json() for (a, b), p in self.pairs.items()}
        if self.settings:
            out["settings"] = self.settings
        return out


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
         device: str = "cpu", plots: bool = True, show_progress: bool = True, *,
         spectral: bool = False, esd: bool = False, rank: int | None = None, top_frac: float | None = None, svd: str = "auto",
         svd_dtype: str = "auto", bins: int = 20, tol: float = 1e-5,
         compare_pairs: list[tuple[str, str]] | str | None = "auto",
         spectra_for: list[str] | None = None, chunk_elems: int | None = None, null_seed: int = 0,
         null_models: list[str] | None = None) -> DiffResult:
    """Compare each of `others` ({display name: checkpoint}) with `base`; files go to `out_dir` if given.

    Always: relative update ||dW||_F / ||W_b||_F, update sparsity (`changed_frac`: |dW_ij| > `tol`;
    `unchanged_frac`: bit-for-bit equal), per tensor and aggregated per layer / module / cell, and the
    cosine between the updates of model pairs (`compare_pairs`: "auto" = all pairs when there are 2
    to 6 models, a list of (a, b) names, or None).

    With `spectral=True`, per 2-D weight: singular values of base and model, their relative change,
    principal angles between top-k and bottom-k left/right singular subspaces (degrees), projection
    distance, alignment, diagonal/rotation energy split of U_b^T dW V_b, stable and effective rank of
    dW, and WeightWatcher-style ESD alpha / stable rank of both matrices (see `spectral`). k is
    `rank`, or ceil(`top_frac` * min(m, n)), or 5% of min(m, n) by default; giving `rank` or
    `top_frac` also switches large matrices to a truncated randomised SVD (top-k metrics only) unless
    `svd="full"`. `bins` spectrum ranges make the principal-angle curve. `svd_dtype`: "auto" computes
    in float64 up to 2^18 entries and float32 above. Very tall matrices (embeddings, LM heads) are
    analysed from their streamed float64 Gram matrices, never loaded whole; with svd="auto" so is every
    float32-size matrix at least twice as long as wide (faster than two float32 SVDs and more
    accurate; svd="full" uses LAPACK's SVD for all but the huge ones). Each fully decomposed matrix
    also gets the same top-k angle and singular-value change for a norm-matched random update of the
    base (`null_principal_angle_top`, `null_sv_rel_change_top`; `tensor_metrics.random_update_null`,
    seeded by `null_seed` and the tensor name; `tensor_metrics.NULL_DRAWS` draws, each draw's total as
    `..._d<i>`): the null of a rotation-vs-rescaling comparison, for the models `null_models` (None: all).

    With `esd=True` (and not `spectral`), only singular values: their relative changes and the
    WeightWatcher-style ESD summaries (alpha, alpha_weighted, stable rank, log spectral norm) of
    base and models, at the cost of `torch.linalg.svdvals`.
    """
    if not others:
        raise UserError("diff needs at least one checkpoint to compare with the base")
    opts = DiffOptions.parse(spectral=spectral, esd=esd, rank=rank, top_frac=top_frac, svd=svd, svd_dtype=svd_dtype,
                             bins=bins, tol=tol, device=str(device), null_seed=null_seed, null_models=null_models,
                             **({} if chunk_elems is None else {"chunk_elems": chunk_elems}))
    pairs = _pairs(list(others), compare_pairs)
    b = Checkpoint(base)
    cks = {name: Checkpoint(p) for name, p in others.items()}
    names = None
    for ck in cks.values():  # fail before any work
        got = check_compatible(b, ck)
        names = names or got
    with progress_bar(len(names) * len(cks), "diff", enabled=show_progress) as advance:
        res = scan(b, cks, names, opts, pairs, progress=advance)
    curves = pd.DataFrame(res.curves)
    spectra = pd.DataFrame(res.spectra)
    summaries, tables = {}, {}
    for name in cks:
        rows = pd.DataFrame(res.rows[name])
        rows.insert(0, "model", name)
        tables[name] = rows
        summaries[name] = summarise(rows, spectra_for=spectra_for,
                                    curves=_only(curves, name), spectra=_only(spectra, name))
    pair_sums, pair_tables = {}, {}
    for a, bb in pairs:
        t = pd.DataFrame(res.pair_rows[(a, bb)])
        t.insert(0, "b", bb)
        t.insert(0, "a", a)
        pair_tables[(a, bb)] = t
        pair_sums[(a, bb)] = summarise_pair(t, a, bb)
    settings = {"spectral": spectral, "esd": esd or spectral, "rank": rank, "top_frac": top_frac, "svd": svd, "svd_dtype": svd_dtype,
                "bins": bins, "tol": tol, "device": str(device),
                "angles": "degrees", "k_default_frac": 0.05}
    result = DiffResult(str(base), summaries, tables, pair_sums, pair_tables, curves, spectra, settings)
    if out_dir is not None:
        write_outputs(result, Path(out_dir), plots)
    return result


def _only(df: pd.DataFrame, model: str) -> pd.DataFrame:
    return df[df["model"] == model] if not df.empty else df


def _pairs(models: list[str], spec) -> list[tuple[str, str]]:
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec == "auto":
            return list(itertools.combinations(models, 2)) if 2 <= len(models) <= MAX_DEFAULT_PAIRS_MODELS else []
        if spec == "all":
            return list(itertools.combinations(models, 2))
        raise UserError(f"compare_pairs must be 'auto', 'all', None or a list of (a, b) names, not {spec!r}")
    out = []
    for p in spec:
        if len(p) != 2 or p[0] == p[1]:
            raise UserError(f"compare_pairs: {p!r} is not a pair of two different model names")
        for m in p:
            if m not in models:
                raise UserError(f"compare_pairs: unknown model {m!r} (models: {', '.join(models)})")
        out.append((p[0], p[1]))
    return list(dict.fromkeys(out))


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def _write_table(df: pd.DataFrame, out: Path, stem: str, csv: bool = True) -> None:
    if csv:
        atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False))
    _write_parquet(df, out / f"{stem}.parquet")


def write_outputs(result: DiffResult, out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_table(result.table, out, "tensors")
    if result.pair_tables:
        _write_table(pd.concat(result.pair_tables.values(), ignore_index=True), out, "pairs")
    if not result.curves.empty:
        _write_table(result.curves, out, "angle_curves")
    if not result.spectra.empty:
        # lists of singular values per matrix: parquet only (a CSV cell would be a long string)
        _write_table(result.spectra, out, "spectra", csv=False)
    if plots:
        write_plots(result, out)
    atomic_write_json(out / "diff.json", result.to_json())


def write_plots(result: DiffResult, out: Path) -> list[Path]:
    from posttrain.analysis.diagnostics import heatmaps
    from posttrain.report import plots as P

    js = {k: v.to_json() for k, v in result.summaries.items()}
    figs = [(P.module_bars(js), "rel_update_by_module.png")]
    for key, plot in heatmaps():
        if any(v.get(key) for v in js.values()):
            figs.append((P.layer_module_heatmaps(js, key, plot.title, cbar_label=plot.cbar, fmt=plot.fmt), plot.file))
    if any(s.has_spectral for s in result.summaries.values()):
        if result.settings.get("spectral", True):
            figs.append((P.angle_curves(js), "angle_curves.png"))
        if any(v.get("spectra") for v in js.values()):
            figs.append((P.spectra(js), "spectra.png"))
    if result.pairs:
        figs.append((P.cosine_heatmaps({f"{a} vs {b}": p.to_json() for (a, b), p in result.pairs.items()}),
                     "update_cosine_heatmap.png"))
    paths = []
    for fig, fname in figs:
        data = P.to_png(fig)
        atomic_write_bytes(out / fname, data)
        paths.append(out / fname)
    return paths
