"""Figures of multi-seed studies and sweeps: per-seed points around their mean, metrics against a
sweep axis (rendered off-screen like posttrain/report/plots.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from posttrain.report.plots import color, finish_panels, panel_grid, plt


def _vals(node: Any) -> list[float]:
    """The per-seed values of an aggregated leaf (a plain number counts as one)."""
    if isinstance(node, dict) and "values" in node:
        return [float(v) for v in node["values"] if v is not None]
    return [float(node)] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


def seed_dots(models: dict[str, dict], forgetting: dict[str, Any], seeds: list[int]):
    """One panel per model: each metric's per-seed values as dots (one colour per seed) and their
    mean +/- sd as a bar; accuracies and forgetting on the same 0..1 scale."""
    names = list(models)
    probes = list(next(iter(models.values())).get("retention") or {}) if models else []
    metrics = [("in-domain", lambda n: models[n].get("id_acc")), ("OOD", lambda n: models[n].get("ood_acc"))]
    metrics += [(f"ret. {p}", lambda n, p=p: (models[n].get("retention") or {}).get(p)) for p in probes]
    metrics.append(("forgetting", lambda n: forgetting.get(n)))
    ncols = min(3, max(1, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.0 * nrows), squeeze=False, sharey=True)
    flat = [ax for row in axes for ax in row]
    seed_colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(seeds)}
    for ax, name in zip(flat, names):
        for x, (label, get) in enumerate(metrics):
            node = get(name)
            if node is None:
                continue
            raw = node.get("values") if isinstance(node, dict) else [node]
            offsets = np.linspace(-0.18, 0.18, len(raw)) if len(raw) > 1 else [0.0]
            for dx, s, v in zip(offsets, seeds, raw):
                if v is not None:
                    ax.plot(x + dx, v, "o", ms=4, color=seed_colors[s], label=f"seed {s}" if x == 0 else None)
            vals = _vals(node)
            if vals:
                mean = float(np.mean(vals))
                sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                ax.errorbar(x, mean, yerr=sd, fmt="_", ms=18, color="black", capsize=4, lw=1.2)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([m[0] for m in metrics], rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10, color=color(name, names.index(name)))
        ax.grid(axis="y", alpha=0.3)
    for ax in flat[len(names):]:
        ax.axis("off")
    flat[0].set_ylabel("accuracy / forgetting")
    flat[0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def seed_curves(curves: dict[str, dict[int, list[dict]]], keys: list[tuple[str, str]], ncols: int = 3):
    """Training curves of every seed: one panel per (metric key, label), one thin line per (method,
    seed) in the method's colour."""
    fig, flat = panel_grid(len(keys), ncols)
    for ax, (key, label) in zip(flat, keys):
        for i, (name, by_seed) in enumerate(curves.items()):
            for j, rows in enumerate(by_seed.values()):
                pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, lw=1, alpha=0.75, color=color(name, i), label=name if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    return finish_panels(fig, flat, len(keys))


def axis_panels(axis: str, positions: list[str], panels: list[tuple[str, dict[str, list[Any]]]]):
    """Metrics against one sweep axis: one panel per (title, {line label: [node per position]}),
    nodes being aggregated leaves; x = the axis values in sweep order (evenly spaced), y = the mean
    with +/- sd error bars and the per-seed values as faint dots."""
    fig, flat = panel_grid(len(panels), 3)
    xs = np.arange(len(positions))
    for ax, (title, lines) in zip(flat, panels):
        for i, (label, nodes) in enumerate(lines.items()):
            c = color(label.split(" [")[0], i)
            means, sds = [], []
            for x, node in zip(xs, nodes):
                vals = _vals(node)
                means.append(float(np.mean(vals)) if vals else np.nan)
                sds.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
                if len(vals) > 1:
                    ax.plot([x] * len(vals), vals, ".", ms=3, alpha=0.4, color=c)
            ax.errorbar(xs, means, yerr=sds, marker="o", ms=4, capsize=3, lw=1.3, color=c, label=label)
        ax.set_xticks(xs)
        ax.set_xticklabels(positions, rotation=30 if max(map(len, positions)) > 6 else 0, ha="right"
                           if max(map(len, positions)) > 6 else "center", fontsize=8)
        ax.set_xlabel(axis, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    return finish_panels(fig, flat, len(panels), legend_size=7)
