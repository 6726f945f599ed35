"""Matplotlib figures shared by `posttrain diff` and the HTML report (rendered off-screen)."""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PALETTE = {"base": "#7f7f7f", "sft": "#d62728", "grpo": "#1f77b4", "ppo": "#2ca02c", "rloo": "#9467bd",
           "ei": "#ff7f0e", "self_sft": "#8c564b"}


def color(name: str, i: int = 0) -> str:
    return PALETTE.get(name, plt.cm.tab10(i % 10))


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def module_bars(summaries: dict[str, dict]):
    """Relative update per module type, one bar group per module, one bar per model."""
    names = list(summaries)
    modules = [m for m in dict.fromkeys(m for s in summaries.values() for m in s["rel_update_by_module"])]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(modules)), 3.2))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = [summaries[name]["rel_update_by_module"].get(m, np.nan) for m in modules]
        ax.bar(np.arange(len(modules)) + i * width, vals, width, label=name, color=color(name, i))
    ax.set_xticks(np.arange(len(modules)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(modules, rotation=30, ha="right")
    ax.set_ylabel("||dW|| / ||W_base||")
    ax.set_title("relative update by module type")
    ax.legend(fontsize=8)
    return fig


def panel_grid(n: int, ncols: int = 3):
    """A figure of n panels, up to `ncols` per row: (fig, the axes in reading order)."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.1 * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def finish_panels(fig, flat: list, used: int, legend: bool = True, legend_size: int = 8):
    """Blank the unused panels of a `panel_grid`, put the legend on the first, lay out."""
    for ax in flat[used:]:
        ax.axis("off")
    if legend:
        flat[0].legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


def training_curves(curves: dict[str, list[dict]], keys: list[tuple[str, str]], ncols: int = 3):
    """One panel per (metric key, label), up to `ncols` per row; one line per method."""
    fig, flat = panel_grid(len(keys), ncols)
    for ax, (key, label) in zip(flat, keys):
        for i, (name, rows) in enumerate(curves.items()):
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and not _nan(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=name, color=color(name, i))
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    return finish_panels(fig, flat, len(keys))


def format_share_curves(series: dict[str, list[dict]], ncols: int = 3):
    """One panel per method: the share of each format among the completions it sampled at each
    training step (Echo Chamber's figure); `series`: {method: [{step, samples, shares}]}."""
    fig, flat = panel_grid(len(series), ncols)
    formats = sorted({f for pts in series.values() for p in pts for f in p["shares"]})
    for ax, (name, pts) in zip(flat, series.items()):
        steps = [p["step"] for p in pts]
        for i, f in enumerate(formats):
            ax.plot(steps, [p["shares"].get(f, 0.0) for p in pts], marker="o" if len(pts) < 30 else None, ms=3,
                    label=f, color=color(f, i))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_title(f"{name}: format shares of its samples", fontsize=10)
        ax.grid(alpha=0.3)
    # every sample malformed: empty panels, no legend
    return finish_panels(fig, flat, len(series), legend=bool(formats))
    return fig


def accuracy_bars(models: dict[str, dict]):
    """ID, OOD and mean retention accuracy per model."""
    names = list(models)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        m = models[name]
        ret = m.get("retention") or {}
        vals = [m.get("id_acc", np.nan), m.get("ood_acc", np.nan), float(np.mean(list(ret.values()))) if ret else np.nan]
        ax.bar(np.arange(3) + i * width, vals, width, label=name, color=color(name, i))
    ax.set_xticks(np.arange(3) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(["in-domain", "out-of-domain", "retention (mean)"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (greedy)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


def recovery_curves(repairs: dict[str, dict]):
    """Repair sweeps: OOD gap recovered (left) and in-domain gain kept (right) against the swept parameter.

    One line per series of `run_repair_sweep`'s ``repairs`` mapping (entries sharing ``series``),
    with x = the entry's ``x`` (k for uv_merge, the layer fraction for reset_layers, alpha for
    interpolate). Entries without a numeric x or with a None fraction are left out of that panel.
    """
    series: dict[str, list[dict]] = {}
    for name, e in repairs.items():
        x = e.get("x")
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not _nan(x):
            series.setdefault(f"{e.get('series', e.get('method', name))}  (x = {e.get('axis', 'x')})", []).append(e)
    panels = [("ood_recovered_frac", "OOD gap recovered"), ("id_kept_frac", "in-domain gain kept")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for i, (label, entries) in enumerate(series.items()):
            pts = sorted((e["x"], e[key]) for e in entries if e.get(key) is not None and not _nan(e[key]))
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=4, label=label, color=plt.cm.tab10(i % 10))
        for level in (0.0, 1.0):
            ax.axhline(level, color="#999999", lw=0.8, ls="--")
        ax.set_xlabel("swept parameter (k, layer fraction or alpha)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    if not series:
        axes[0][0].text(0.5, 0.5, "no repairs with a numeric swept parameter", ha="center", va="center",
                        transform=axes[0][0].transAxes)
    else:
        handles: dict[str, object] = {}
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", fontsize=7,
                   ncol=min(2, len(series)), bbox_to_anchor=(0.5, -0.02 - 0.045 * ((len(series) + 1) // 2)))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# weight-space diagnostics of `posttrain diff` (inputs: the per-model JSON summaries of diff.json)


def layer_module_heatmaps(summaries: dict[str, dict], key: str, title: str, cbar_label: str = "",
                          vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
                          fmt: str = "{:.3f}", annotate_max_layers: int = 16):
    """One layer x module heatmap per entry of `summaries` from its `key` ({module: per-layer list}).

    Shared colour scale (default: 0 .. the largest value; pass vmin/vmax for signed quantities).
    Cells are annotated while there are at most `annotate_max_layers` layers.
    """
    names = [n for n in summaries if summaries[n].get(key)]
    if not names:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no {key} in these summaries", ha="center", va="center")
        return fig
    modules = list(dict.fromkeys(m for n in names for m in summaries[n][key]))
    n_layers = max(len(v) for n in names for v in summaries[n][key].values())
    vals = [x for n in names for v in summaries[n][key].values() for x in v if x is not None and not _nan(x)]
    lo = vmin if vmin is not None else 0.0
    hi = vmax if vmax is not None else (max(vals, default=1.0) or 1.0)
    width = 1.2 + min(0.55 * max(n_layers, 4), 14) * len(names)
    fig, axes = plt.subplots(1, len(names), figsize=(width, 0.42 * len(modules) + 1.6), squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        cells = summaries[name][key]
        grid = np.full((len(modules), n_layers), np.nan)
        for i, m in enumerate(modules):
            for j, x in enumerate(cells.get(m, [])):
                if x is not None and not _nan(x):
                    grid[i, j] = x
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(name)
        step = max(1, n_layers // 16)
        ax.set_xticks(range(0, n_layers, step))
        ax.set_xlabel("layer")
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels(modules if ax is axes[0][0] else [])
        if n_layers <= annotate_max_layers:
            mid = lo + 0.6 * (hi - lo)
            for i in range(len(modules)):
                for j in range(n_layers):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, fmt.format(grid[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if grid[i, j] < mid else "black")
    if im is not None:
        cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        if cbar_label:
            cb.set_label(cbar_label)
    fig.suptitle(title, fontsize=10)
    return fig


def cosine_heatmaps(pairs: dict[str, dict]):
    """Cosine between two models' updates dW_a, dW_b per layer x module ({label: PairSummary JSON})."""
    return layer_module_heatmaps(pairs, "cosine_by_layer_module", "cosine of the two updates <dW_a, dW_b> / (|dW_a| |dW_b|)",
                                 vmin=-1.0, vmax=1.0, cmap="RdBu_r", fmt="{:.2f}")


def angle_curves(summaries: dict[str, dict]):
    """Principal angle (degrees) against the normalised singular index (0 = top, 1 = bottom), per model.

    From each summary's `angle_curve` ({"x", "left", "right"}): the mean over matrices of the angle
    between base and fine-tuned singular subspaces of each spectrum range. A U shape means the
    rotation concentrates at the top and the bottom of the spectrum.
    """
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), squeeze=False, sharey=True)
    any_curve = False
    for ax, side in zip(axes[0], ("left", "right")):
        for i, (name, s) in enumerate(summaries.items()):
            c = s.get("angle_curve") or {}
            if c.get(side):
                any_curve = True
                ax.plot(c["x"], c[side], marker="o", ms=3, label=name, color=color(name, i))
        ax.set_xlabel("normalised singular index (0 = largest)")
        ax.set_title(f"{side} singular vectors", fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("principal angle (degrees)")
    if any_curve:
        axes[0][0].legend(fontsize=8)
    else:
        axes[0][0].text(0.5, 0.5, "no spectral diagnostics", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle("where in the spectrum the singular vectors rotated", fontsize=10)
    fig.tight_layout()
    return fig


def spectra(summaries: dict[str, dict], names: list[str] | None = None, max_panels: int = 6):
    """Singular values before (base, grey) and after (each model) for the matrices in the summaries'
    `spectra` (or only `names`), one panel per matrix, log scale; relative change on a twin axis."""
    all_names = list(dict.fromkeys(n for s in summaries.values() for n in (s.get("spectra") or {})))
    chosen = [n for n in (names or all_names) if n in all_names][:max_panels]
    if not chosen:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no singular-value spectra in these summaries", ha="center", va="center")
        return fig
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.2 * rows), squeeze=False)
    for ax, tname in zip(axes.flat, chosen):
        base_drawn = False
        twin = ax.twinx()
        rels = []
        for i, (model, s) in enumerate(summaries.items()):
            sp_ = (s.get("spectra") or {}).get(tname)
            if not sp_:
                continue
            x = np.asarray(sp_["index"])
            if not base_drawn:
                ax.plot(x, sp_["base"], color=PALETTE["base"], lw=2, label="base")
                base_drawn = True
            ax.plot(x, sp_["ft"], color=color(model, i), lw=1, label=model)
            rel = np.asarray([np.nan if v is None else v for v in sp_["rel_change"]], dtype=float)
            twin.plot(x, rel, color=color(model, i), lw=0.7, ls=":", alpha=0.8)
            rels.append(rel[np.isfinite(rel)])
        if rels and np.concatenate(rels).size:
            # the tiniest singular values can change by orders of magnitude more than the rest: keep
            # the axis on the bulk (2nd-98th percentile) and let those spikes leave the frame
            lo, hi = np.percentile(np.concatenate(rels), [2, 98])
            pad = 0.1 * (hi - lo) or 1e-6
            twin.set_ylim(lo - pad, hi + pad)
        ax.set_yscale("log")
        ax.set_title(tname.replace(".weight", ""), fontsize=8)
        ax.set_xlabel("singular index")
        ax.grid(alpha=0.3)
        twin.set_ylabel("relative change (dotted)", fontsize=7)
        twin.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    axes[0][0].set_ylabel("singular value")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("singular-value spectra before / after", fontsize=10)
    fig.tight_layout()
    return fig


def trajectories(points: list[dict], keys: list[tuple[str, str]] | None = None):
    """Diagnostics over training steps: one panel per (key, label), one line per run.

    `points` are rows {"run": name, "step": int, key: value, ...} (see `posttrain.analysis.trajectory`).
    Default keys: relative update, update sparsity, and, when present, the top principal angle, the
    top singular-value change and the cosine between consecutive checkpoints' updates.
    """
    if keys is None:
        keys = [("rel_update_total", "relative update ||dW|| / ||W_base||"),
                ("changed_frac", "fraction of entries changed")]
        for k, label in (("principal_angle_top", "top-k principal angle (degrees)"),
                         ("sv_rel_change_top", "top-k singular-value change"),
                         ("cosine_prev", "cosine with the previous checkpoint's update")):
            if any(p.get(k) is not None for p in points):
                keys.append((k, label))
    runs: dict[str, list[dict]] = {}
    for p in points:
        runs.setdefault(p["run"], []).append(p)
    curves = {run: sorted(rows, key=lambda p: p["step"]) for run, rows in runs.items()}
    return training_curves(curves, keys, ncols=len(keys))


def forgetting_scatter(points: list[dict], fits: dict[str, dict], panels: list[tuple[str, str]]):
    """Forgetting against each predictor (one panel per (key, label)), one labelled dot per model,
    the least-squares line where `fits[key]` has one, Spearman rho and R^2 in the title."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        pts = [(p[key], p["forgetting"], p.get("name", "")) for p in points
               if isinstance(p.get(key), (int, float)) and isinstance(p.get("forgetting"), (int, float))]
        for i, (x, y, name) in enumerate(pts):
            ax.scatter([x], [y], color=color(name.split("/")[-1], i), s=30, zorder=3)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        fit = fits.get(key) or {}
        if fit.get("slope") is not None and pts:
            xs = np.linspace(min(x for x, _, _ in pts), max(x for x, _, _ in pts), 2)
            ax.plot(xs, fit["intercept"] + fit["slope"] * xs, color="#555555", lw=1, ls="--")
        rho, r2 = fit.get("rho"), fit.get("r2")
        stats = f"rho {'–' if rho is None else f'{rho:+.2f}'}, R² {'–' if r2 is None else f'{r2:.2f}'}, n {len(pts)}"
        ax.set_title(f"{label}\n{stats}", fontsize=9)
        ax.set_xlabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("forgetting (retention drop)")
    fig.tight_layout()
    return fig


def healing_curves(checkpoint_evals: dict[str, list[dict]], starts: dict[str, dict], rl_curves: dict[str, list[dict]],
                   id_key: str, ood_key: str, peaks: dict[str, dict] | None = None):
    """OOD (left) and in-domain (right) accuracy over training steps: each method's kept checkpoints
    (solid; the study's full problem sets; the peak-OOD point ringed) and each run that started from one
    of them (dashed, x = the start's step + its own step; its training-curve evaluations,
    `eval/<task>/acc` in metrics.jsonl, on the first problems of the same sets)."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), squeeze=False)
    panels = [("ood_acc", ood_key, "OOD accuracy"), ("id_acc", id_key, "in-domain accuracy")]
    names = list(checkpoint_evals) + [n for n in starts if n not in checkpoint_evals]
    for ax, (acc, key, title) in zip(axes[0], panels):
        for name, pts in checkpoint_evals.items():
            c = color(name, names.index(name))
            ax.plot([p["step"] for p in pts], [p[acc] for p in pts], marker="o", ms=4, color=c, label=f"{name} (checkpoints)")
            peak = (peaks or {}).get(name)
            if peak is not None:
                ax.plot([peak["step"]], [peak[acc]], marker="o", ms=11, mfc="none", mec=c, mew=1.5)
        for name, st in starts.items():
            col = f"eval/{key}/acc"
            pts = [(st["step"] + r["step"], r[col]) for r in rl_curves.get(name, []) if r.get(col) is not None
                   and not _nan(r[col])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, ls="--", marker="s", ms=3, color=color(name, names.index(name)),
                        label=f"{name} (from {st['init']})")
        ax.set_xlabel("training steps (start's step + own step)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=min(3, len(labels)),
                   bbox_to_anchor=(0.5, -0.02 - 0.05 * ((len(labels) + 2) // 3)))
    fig.tight_layout()
    return fig
