"""report.html of a multi-seed study: every metric as mean ± sd with its per-seed values, the
findings' multi-seed verdicts with held_in, and links to (and the curves of) each seed's own report."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from posttrain.aggregate import as_spread
from posttrain.errors import UserError
from posttrain.io import read_json
from posttrain.report.schema import read_object
from posttrain.report.html import CSS, _img, _read_metrics
from posttrain.report import multi_plots as MP

VERDICT = {True: '<span class="yes">holds</span>', False: '<span class="no">does not hold</span>',
           None: '<span class="na">not established</span>'}
MARK = {True: '<span class="yes">✓</span>', False: '<span class="no">✗</span>', None: '<span class="na">–</span>'}
EXTRA_CSS = ".pts{color:#888;font-size:.8em;display:block} td.f{text-align:center}"


def mean_sd(node: Any, scale: float = 1.0, fmt: str = "{:.1f}", signed: bool = False, points: bool = True) -> str:
    """`mean ± sd` of an aggregated leaf (scaled, e.g. 100 for percent) with its per-seed values below."""
    s = as_spread(node)
    if s is None or s["mean"] is None:
        return "–"
    f = ("{:+" + fmt[2:]) if signed else fmt
    text = f.format(scale * s["mean"]) + ("" if s["sd"] is None else " ± " + fmt.format(scale * s["sd"]))
    if points and len(s["values"]) > 1:
        pts = ", ".join("–" if v is None else f.format(scale * v) for v in s["values"])
        text += f'<span class="pts">{html.escape(pts)}</span>'
    return text


def accuracy_table(res: dict) -> str:
    models = res["models"]
    probes = list(next(iter(models.values())).get("retention") or {})
    head = ["model", "in-domain %", "OOD %"] + [f"retention: {p} %" for p in probes] + ["forgetting (pt)",
                                                                                        "ID malformed %"]
    rows = []
    for name, m in models.items():
        cells = [f'<td class="l"><b>{html.escape(name)}</b></td>', f"<td>{mean_sd(m.get('id_acc'), 100)}</td>",
                 f"<td>{mean_sd(m.get('ood_acc'), 100)}</td>"]
        cells += [f"<td>{mean_sd(m['retention'].get(p), 100)}</td>" for p in probes]
        forg = res.get("forgetting", {}).get(name)
        cells.append(f"<td>{mean_sd(forg, 100, signed=True) if forg is not None else '–'}</td>")
        cells.append(f"<td>{mean_sd(m.get('id_malformed'), 100)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    th = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
    return f"<table><tr>{th}</tr>{''.join(rows)}</table>"


def _wall(res: dict) -> str:
    """Elapsed time, and the seeds' own times summed when they ran side by side."""
    if res.get("elapsed_seconds") is None:
        return f"total wall time {res['wall_seconds']:.0f}s"
    return (f"wall time {res['elapsed_seconds']:.0f}s ({res.get('jobs', 1)} at a time; "
            f"{res['wall_seconds']:.0f}s summed over the seeds)")


def multi_findings_table(findings: list[dict]) -> str:
    rows = []
    for f in findings:
        rows.append(f'<tr><td class="l">{html.escape(f["claim"])}</td><td class="l">{VERDICT[f.get("holds")]}</td>'
                    f'<td class="f">{html.escape(str(f.get("held_in", "")))}</td>'
                    f'<td class="l">{html.escape(f.get("evidence", ""))}</td></tr>')
    return ('<table><tr><th class="l">published claim (rule used here)</th><th class="l">over the seeds</th>'
            f'<th>held in</th><th class="l">numbers</th></tr>{"".join(rows)}</table>')


def per_seed_grid(findings: list[dict]) -> str:
    seeds = findings[0].get("seeds", []) if findings else []
    head = "".join(f"<th>seed {s}</th>" for s in seeds)
    rows = "".join(f'<tr><td class="l">{html.escape(f["id"])}</td>'
                   + "".join(f'<td class="f">{MARK[v]}</td>' for v in f.get("per_seed", [])) + "</tr>"
                   for f in findings)
    return f'<table><tr><th class="l">finding</th>{head}</tr>{rows}</table>'


DIAG_COLUMNS = [("rel_update_total", "rel. update", 1.0, "{:.3f}"),
                ("principal_angle_top", "angle top-k (°)", 1.0, "{:.2f}"),
                ("sv_rel_change_top", "top-k s.v. change", 1.0, "{:.4f}"),
                ("energy_rotation", "rotation energy %", 100.0, "{:.1f}")]


def diagnostics_table(diag: dict) -> str:
    cols = [c for c in DIAG_COLUMNS if any(isinstance(d, dict) and d.get(c[0]) is not None for d in diag.values())]
    if not cols:
        return ""
    rows = "".join(f'<tr><td class="l">{html.escape(n)}</td>'
                   + "".join(f"<td>{mean_sd(d.get(k), s, f)}</td>" for k, _, s, f in cols) + "</tr>"
                   for n, d in diag.items() if isinstance(d, dict))
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _, _ in cols)
    return ("<h2>Where the weights moved</h2><p>Each method's update against its seed's base (unweighted means "
            "over matrices, as in each seed's report).</p>"
            f'<table><tr><th class="l">method</th>{head}</tr>{rows}</table>')


def repairs_table(reps: dict) -> str:
    if not reps:
        return ""
    rows = "".join(f'<tr><td class="l">{html.escape(n)}</td><td>{mean_sd(r.get("id_acc"), 100)}</td>'
                   f'<td>{mean_sd(r.get("ood_acc"), 100)}</td><td>{mean_sd(r.get("ood_recovered_frac"), 100)}</td>'
                   f'<td>{mean_sd(r.get("id_kept_frac"), 100)}</td></tr>'
                   for n, r in reps.items() if isinstance(r, dict))
    return ("<h2>Repairs</h2><p>OOD recovered = (ood(repaired) − ood(damaged)) / (ood(reference) − ood(damaged)); "
            "in-domain gain kept = (id(repaired) − id(base)) / (id(damaged) − id(base)); percent.</p>"
            '<table><tr><th class="l">repair</th><th>in-domain %</th><th>OOD %</th><th>OOD recovered %</th>'
            f"<th>ID gain kept %</th></tr>{rows}</table>")


def build_seeds_report(run: Path) -> str:
    res = read_object(run / "results.json")
    if res.get("kind") != "seeds":
        raise UserError(f"{run}/results.json is not a multi-seed study's")
    seeds = res["seeds"]
    runs = res.get("runs", {})
    links = " · ".join(f'<a href="{html.escape(rel)}/report.html">seed {html.escape(s)}</a>' for s, rel in runs.items())
    body = [f"<h1>posttrain study <code>{html.escape(str(res['study']))}</code> over {len(seeds)} seeds</h1>",
            f'<p class="meta">seeds {", ".join(map(str, seeds))} · {_wall(res)} · '
            f'in-domain task <code>{html.escape(res["id_task"])}</code> · OOD task <code>{html.escape(res["ood_task"])}</code>'
            f' · each seed\'s own report: {links}</p>',
            "<h2>Accuracy</h2><p>Every seed runs the whole study (its own pretraining, prompts, rollouts and "
            "evaluation problems). Cells: mean ± sample sd over the seeds, the per-seed values below in seed order. "
            "Forgetting = mean drop of retention accuracy versus the same seed's base, in points.</p>",
            accuracy_table(res),
            _img(MP.seed_dots(res["models"], res.get("forgetting", {}), seeds), "per-seed accuracy"),
            "<h2>Findings</h2><p>A comparison holds when the 95% paired t-interval of its per-seed margins lies "
            "above zero (or its threshold), does not hold when it lies below, and is not established otherwise; "
            "any other claim holds when it held in every seed. <i>Held in</i>: the seeds whose own verdict held.</p>",
            multi_findings_table(res.get("findings", [])),
            "<h3>Per seed</h3>", per_seed_grid(res.get("findings", [])),
            diagnostics_table(res.get("diagnostics") or {}), repairs_table(res.get("repairs") or {})]
    curves: dict[str, dict[int, list[dict]]] = {}
    for s, rel in runs.items():
        seed_res = run / rel / "results.json"
        if not seed_res.is_file():
            continue
        for name in read_json(seed_res).get("training", {}):
            rows = _read_metrics(run / rel / "methods" / name / "metrics.jsonl")
            if rows:
                curves.setdefault(name, {})[int(s)] = rows
    if curves:
        keys = [(f"eval/{res['id_task']}/acc", "in-domain accuracy (greedy, 64 problems)"),
                (f"eval/{res['ood_task']}/acc", "OOD accuracy (greedy, 64 problems)"), ("loss", "training loss")]
        if any("rollout/reward" in r for by in curves.values() for rows in by.values() for r in rows):
            keys.append(("rollout/reward", "on-policy reward (rollouts)"))
        body.append("<h2>Training curves</h2><p>One line per method and seed.</p>")
        body.append(_img(MP.seed_curves(curves, keys), "training curves of every seed"))
    body.append("<h2>Per-seed results</h2><p>Each seed's complete report (plots, diagnostics, examples): "
                f"{links}.</p>")
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    body.append(f"<details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>posttrain · {html.escape(str(res['study']))} · "
            f"{len(seeds)} seeds</title><style>{CSS}{EXTRA_CSS}</style></head><body>{''.join(body)}</body></html>")
