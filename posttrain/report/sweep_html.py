"""report.html of a sweep: each finding per cell (held k/n) as a grid, the headline metrics per
cell, and each headline metric against each axis; every cell links to its own report."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from posttrain.errors import UserError
from posttrain.report.schema import read_object
from posttrain.report import multi_plots as MP
from posttrain.report.html import CSS, _img
from posttrain.report.seeds_html import EXTRA_CSS, MARK, mean_sd
from posttrain.study_sweep import axis_labels, format_value

GRID_CSS = (".grid td.f{white-space:nowrap} .hold{background:#e6f4ea} .fail{background:#fbe9eb} .open{background:#f6f6f6}"
            " th.v{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;white-space:nowrap;font-weight:normal}")


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def cells_table(sweep: dict) -> str:
    axes = list(sweep["axes"])
    labels = axis_labels(axes)
    head = "".join(f"<th>{html.escape(labels[a])}</th>" for a in axes)
    rows = []
    for c in sweep["cells"]:
        wall = c.get("wall_seconds")
        rows.append(f'<tr><td class="l"><a href="{html.escape(c["path"])}/report.html">{html.escape(c["name"])}</a></td>'
                    + "".join(f"<td>{html.escape(format_value(c['values'][a]))}</td>" for a in axes)
                    + f"<td>{len(c['seeds'])}</td><td>{'–' if wall is None else f'{wall:.0f}'}</td></tr>")
    rows = "".join(rows)
    return f'<table><tr><th class="l">cell (its report)</th>{head}<th>seeds</th><th>wall s</th></tr>{rows}</table>'


def findings_grid(sweep: dict) -> str:
    """Rows: findings; columns: cells; each entry the cell's verdict and in how many seeds it held."""
    names = [c["name"] for c in sweep["cells"]]
    head = "".join(f'<th class="v">{html.escape(n)}</th>' for n in names)
    rows = []
    for f in sweep["findings"]:
        tds = []
        for n in names:
            e = f["cells"].get(n)
            if e is None:
                tds.append('<td class="f open">–</td>')
                continue
            cls = {True: "hold", False: "fail", None: "open"}[e.get("holds")]
            tip = html.escape(e.get("evidence") or "", quote=True)
            tds.append(f'<td class="f {cls}" title="{tip}">{MARK[e.get("holds")]} {html.escape(str(e.get("held_in")))}</td>')
        rows.append(f'<tr><td class="l" title="{html.escape(f["claim"], quote=True)}">{html.escape(f["id"])}</td>'
                    + "".join(tds) + "</tr>")
    return f'<table class="grid"><tr><th class="l">finding</th>{head}</tr>{"".join(rows)}</table>'


def _models(sweep: dict) -> list[str]:
    return list(dict.fromkeys(m for c in sweep["cells"] for m in c["headline"]["models"]))


def _methods(sweep: dict, section: str) -> list[str]:
    return list(dict.fromkeys(m for c in sweep["cells"] for m in c["headline"].get(section, {})))


def headline_table(sweep: dict) -> str:
    models, methods = _models(sweep), _methods(sweep, "forgetting")
    head = ("".join(f"<th>{html.escape(m)} ID %</th>" for m in models) + "".join(f"<th>{html.escape(m)} OOD %</th>" for m in models)
            + "".join(f"<th>{html.escape(m)} forgetting (pt)</th>" for m in methods))
    rows = []
    for c in sweep["cells"]:
        hm = c["headline"]["models"]
        tds = [f"<td>{mean_sd((hm.get(m) or {}).get('id_acc'), 100)}</td>" for m in models]
        tds += [f"<td>{mean_sd((hm.get(m) or {}).get('ood_acc'), 100)}</td>" for m in models]
        tds += [f"<td>{mean_sd(c['headline']['forgetting'].get(m), 100, signed=True)}</td>" for m in methods]
        rows.append(f'<tr><td class="l">{html.escape(c["name"])}</td>{"".join(tds)}</tr>')
    return f'<table><tr><th class="l">cell</th>{head}</tr>{"".join(rows)}</table>'


def formats_table(sweep: dict) -> str:
    models = _models(sweep)
    rows = []
    for c in sweep["cells"]:
        tds = []
        for m in models:
            e = c["headline"]["models"].get(m) or {}
            fmt = e.get("dominant_format")
            share = (e.get("format_share") or {}).get(fmt) if fmt else None
            tds.append("<td>–</td>" if fmt is None else f"<td><b>{html.escape(fmt)}</b> {mean_sd(share, 100, points=False)}%</td>")
        rows.append(f'<tr><td class="l">{html.escape(c["name"])}</td>{"".join(tds)}</tr>')
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    return f'<table><tr><th class="l">cell</th>{head}</tr>{"".join(rows)}</table>'


def axis_figures(sweep: dict) -> list[str]:
    """Per axis: in-domain and OOD accuracy per model, forgetting and relative update per method, and
    each in-domain format's share per model, against the axis values (other axes: separate lines)."""
    axes = list(sweep["axes"])
    labels = axis_labels(axes)
    models, methods, updated = _models(sweep), _methods(sweep, "forgetting"), _methods(sweep, "rel_update")
    formats = list(dict.fromkeys(f for c in sweep["cells"] for m in c["headline"]["models"].values()
                                 for f in (m.get("format_share") or {})))
    out = []
    for a in axes:
        positions = [_key(v) for v in sweep["axes"][a]]
        others = [o for o in axes if o != a]
        groups: dict[tuple, dict[int, dict]] = {}
        for c in sweep["cells"]:
            g = tuple(_key(c["values"][o]) for o in others)
            groups.setdefault(g, {})[positions.index(_key(c["values"][a]))] = c

        def lines(names: list[str], get) -> dict[str, list[Any]]:
            out_lines = {}
            for name in names:
                for g, by in groups.items():
                    tag = ", ".join(f"{labels[o]}={format_value(json.loads(v))}" for o, v in zip(others, g))
                    out_lines[name + (f" [{tag}]" if tag else "")] = [get(by.get(i), name) for i in range(len(positions))]
            return out_lines

        def model_metric(key: str):
            return lambda c, m: None if c is None else (c["headline"]["models"].get(m) or {}).get(key)

        def section(sec: str):
            return lambda c, m: None if c is None else c["headline"].get(sec, {}).get(m)

        def share(fmt: str):
            return lambda c, m: None if c is None else ((c["headline"]["models"].get(m) or {}).get("format_share") or {}).get(fmt)

        panels = [("in-domain accuracy", lines(models, model_metric("id_acc"))),
                  ("OOD accuracy", lines(models, model_metric("ood_acc"))),
                  ("forgetting (retention drop)", lines(methods, section("forgetting")))]
        if updated:
            panels.append(("relative weight update", lines(updated, section("rel_update"))))
        panels += [(f"share of format '{f}' (in-domain, sampled)", lines(models, share(f))) for f in formats]
        ticks = [format_value(v) for v in sweep["axes"][a]]
        out.append(f"<h3>Against {html.escape(a)}</h3>" + _img(MP.axis_panels(a, ticks, panels), f"metrics against {a}"))
    return out


def build_sweep_report(root: Path) -> str:
    path = root / "sweep.json"
    if not path.is_file():
        raise UserError(f"{root}: no sweep.json (run the sweep into this directory first)")
    sweep = read_object(path)
    axes = "; ".join(f"<code>{html.escape(a)}</code>: {html.escape(', '.join(format_value(v) for v in vs))}"
                     for a, vs in sweep["axes"].items())
    wall = sweep.get("wall_seconds")
    body = [f"<h1>posttrain sweep <code>{html.escape(str(sweep['study']))}</code>: {len(sweep['cells'])} cells</h1>",
            f'<p class="meta">axes {axes} · seeds {", ".join(map(str, sweep["seeds"]))}'
            + ("" if wall is None else f" · wall time {wall:.0f}s") + "</p>",
            "<h2>Cells</h2>", cells_table(sweep),
            "<h2>Findings per cell</h2><p>Each cell's verdict (✓ holds, ✗ does not hold, – not established: within "
            "noise, seeds disagree, or not testable) and in how many of its seeds the claim held. Hover an entry for "
            "its numbers, a finding for its claim and rule.</p>", findings_grid(sweep),
            "<h2>Headline metrics</h2><p>Mean ± sample sd over each cell's seeds (per-seed values below).</p>",
            headline_table(sweep),
            "<h3>Which format each model writes</h3><p>The in-domain solution format with the largest mean share "
            "of sampled completions (Echo Chamber: RL converges to one of the pretraining formats).</p>",
            formats_table(sweep), "<h2>Against each axis</h2>", *axis_figures(sweep)]
    config = (root / "config.yaml").read_text() if (root / "config.yaml").is_file() else ""
    body.append(f"<details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>posttrain sweep · {html.escape(str(sweep['study']))}"
            f"</title><style>{CSS}{EXTRA_CSS}{GRID_CSS}</style></head><body>{''.join(body)}</body></html>")
