"""Matplotlib figures shared by `posttrain diff` and the HTML report (rendered off-screen)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PALETTE = {"base": "#7f7f7f", "sft": "#d62728", "grpo": "#1f77b4", "ppo": "#2ca02c", "rloo": "#9467bd",
           "ei": "#ff7f0e", "self_sft": "#8c564b"}


def color(name: str, i: int = 0) -> str:
    return PALETTE.get(name, plt.cm.tab10(i % 10))


def to_png(fig, path: str | Path | None = None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def update_heatmaps(summaries: dict[str, dict], title: str = "relative update ||dW|| / ||W_base|| by layer x module"):
    """One heatmap per model (rows = module types, columns = layers), on a shared colour scale."""
    names = list(summaries)
    modules = [m for m in dict.fromkeys(m for s in summaries.values() for m in s["rel_update_by_layer_module"])]
    n_layers = max((len(v) for s in summaries.values() for v in s["rel_update_by_layer_module"].values()), default=0)
    vmax = max((x for s in summaries.values() for v in s["rel_update_by_layer_module"].values()
                for x in v if x is not None and not math.isnan(x)), default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 0.55 * max(n_layers, 4) * len(names), 0.42 * len(modules) + 1.6),
                             squeeze=False)
    im = None
    for ax, name in zip(axes[0], names):
        cells = summaries[name]["rel_update_by_layer_module"]
        grid = np.full((len(modules), n_layers), np.nan)
        for i, m in enumerate(modules):
            for j, x in enumerate(cells.get(m, [])):
                if x is not None:
                    grid[i, j] = x
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(name)
        ax.set_xticks(range(n_layers))
        ax.set_xlabel("layer")
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels(modules if ax is axes[0][0] else [])
        for i in range(len(modules)):
            for j in range(n_layers):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < 0.6 * vmax else "black")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


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


def training_curves(curves: dict[str, list[dict]], keys: list[tuple[str, str]], ncols: int = 3):
    """One panel per (metric key, label), up to `ncols` per row; one line per method."""
    ncols = max(1, min(ncols, len(keys)))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.1 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (key, label) in zip(flat, keys):
        for i, (name, rows) in enumerate(curves.items()):
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and not _nan(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=name, color=color(name, i))
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in flat[len(keys):]:
        ax.axis("off")
    flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_bars(models: dict[str, dict]):
    """ID, OOD and mean retention accuracy per model."""
    names = list(models)
    groups = ["id_acc", "ood_acc", "retention"]
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
