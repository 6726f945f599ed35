"""`report.html`: one self-contained page (inline CSS, plots embedded as data URIs) per run."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from posttrain.errors import UserError
from posttrain.io import atomic_write_text, read_json
from posttrain.analysis.diagnostics import heatmaps
from posttrain.report import plots as P

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .meta{color:#666;font-size:.9em}
.yes{color:#1a7f37;font-weight:bold} .no{color:#cf222e;font-weight:bold} .na{color:#888}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0} pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
code{background:#f6f8fa;padding:0 .2em}
"""


def _img(fig, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{P.data_uri(P.to_png(fig))}">'


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy_table(res: dict) -> str:
    models = res["models"]
    ret_tasks = list(next(iter(models.values()))["retention"])
    ks = sorted({k for m in models.values() for k in m.get("id_pass_at_k", {})}, key=int)
    head = ["model", "in-domain", "OOD"] + [f"retention: {t}" for t in ret_tasks] + ["forgetting"]
    head += [f"ID pass@{k}" for k in ks] + ["ID malformed", "ID format shares (sampled)"]
    rows = []
    for name, m in models.items():
        fs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(m["format_share"].items(), key=lambda kv: -kv[1]))
        forg = res["forgetting"].get(name)
        cells = [f'<td class="l"><b>{html.escape(name)}</b></td>', f"<td>{_pct(m['id_acc'])}</td>", f"<td>{_pct(m['ood_acc'])}</td>"]
        cells += [f"<td>{_pct(m['retention'][t])}</td>" for t in ret_tasks]
        cells.append(f"<td>{'–' if forg is None else f'{100 * forg:+.1f} pt'}</td>")
        cells += [f"<td>{_pct(m.get('id_pass_at_k', {}).get(k))}</td>" for k in ks]
        cells += [f"<td>{_pct(m.get('id_malformed'))}</td>", f'<td class="l">{html.escape(fs)}</td>']
        rows.append("<tr>" + "".join(cells) + "</tr>")
    th = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
    return f"<table><tr>{th}</tr>{''.join(rows)}</table>"


def findings_table(findings: list[dict]) -> str:
    rows = []
    for f in findings:
        verdict = {True: '<span class="yes">holds</span>', False: '<span class="no">does not hold</span>',
                   None: '<span class="na">not tested</span>'}[f["holds"]]
        rows.append(f'<tr><td class="l">{html.escape(f["claim"])}</td><td class="l">{verdict}</td>'
                    f'<td class="l">{html.escape(f["evidence"])}</td></tr>')
    return ('<table><tr><th class="l">published claim (rule used here)</th><th class="l">in this run</th>'
            f'<th class="l">numbers</th></tr>{"".join(rows)}</table>')


def examples_block(run: Path, res: dict) -> str:
    parts = []
    for name in res["models"]:
        path = run / "eval" / f"{name}.json"
        if not path.is_file():
            continue
        ex = read_json(path).get(res["id_task"], {}).get("examples", [])
        lines = "\n".join(f"{'✓' if e['correct'] else '✗'} {e['prompt']} {e['completion']}" for e in ex)
        parts.append(f"<h3>{html.escape(name)}</h3><pre>{html.escape(lines)}</pre>")
    return "".join(parts)


def repair_operator(r: dict) -> str:
    """Which operator made a repair, from its recorded parameters. Results written before the
    published operator existed lack `orthonormalize` (they used QR) and `scope` (whole layers)."""
    p = r.get("params") or {}
    if r.get("method") == "uv_merge":
        if p.get("mode") == "magnitude":
            return "magnitude"
        op = "QR" if p.get("orthonormalize", True) else "published"
        return f"{p.get('mode')}, {op}"
    if r.get("method") == "reset_layers":
        return f"scope {p.get('scope', 'layers')}"
    return ""


def repair_section(res: dict) -> str:
    reps = res["repairs"]
    damaged = next(iter(reps.values()))
    rows = []
    for name, r in reps.items():
        kept, rec, se = r.get("id_kept_frac"), r.get("ood_recovered_frac"), r.get("ood_recovered_se")
        ret = (r.get("eval") or {}).get("retention_mean")
        rec_s = _pct(rec) + ("" if rec is None or se is None else f" ± {100 * se:.0f}")
        rows.append(f'<tr><td class="l">{html.escape(name)}</td><td class="l">{html.escape(repair_operator(r))}</td>'
                    f'<td>{_pct(r["id_acc"])}</td><td>{_pct(r["ood_acc"])}</td>'
                    f'<td>{_pct(ret)}</td><td>{rec_s}</td><td>{_pct(kept)}</td></tr>')
    gap, gap_se = damaged.get("ood_gap"), damaged.get("ood_gap_se")
    if gap is not None and damaged.get("ood_recovered_frac") is None and all(
            r.get("ood_recovered_frac") is None for r in reps.values()):
        noise = "" if gap_se is None else f" (2 SE = {200 * gap_se:.1f} points)"
        note = (f'<p class="meta">SFT\'s OOD gap to the reference is {100 * gap:+.1f} points{noise}: not a loss beyond '
                "noise, so no recovered fraction is computed and the repair findings cannot be tested.</p>")
    elif gap is not None and abs(gap) < 0.05:
        note = (f'<p class="meta">The OOD gap to recover is only {100 * gap:+.1f} points: recovered fractions '
                "are noisy.</p>")
    else:
        note = ""
    return ("<h2>Repairing SFT's damage</h2><p>Each repair starts from the SFT model and restores part of the base: "
            "UV-merge swaps in the base's singular directions (direction) or singular values (magnitude) for the top-k "
            "fraction of every 2-D weight's spectrum (embeddings and LM head included), with the published operator "
            "(base and SFT singular vectors concatenated as they are) or our QR variant (re-orthonormalised); "
            "reset-layers copies the first layers from the base (scope reference: their matrices plus the token "
            "embeddings and LM head, norms kept; scope layers: the layers whole); wise interpolates the weights. "
            "OOD recovered = (ood(repaired) − ood(SFT)) / (ood(base) − ood(SFT)) ± its delta-method SE, computed "
            "only when SFT lost OOD accuracy by more than twice the gap's binomial SE; in-domain gain kept = "
            "(id(repaired) − id(base)) / (id(SFT) − id(base)).</p>" + note
            + _img(P.recovery_curves(reps), "recovery curves")
            + '<table><tr><th class="l">repair</th><th class="l">operator</th><th>in-domain</th><th>OOD</th>'
            + "<th>retention (mean)</th><th>OOD recovered</th><th>ID gain kept</th></tr>" + "".join(rows) + "</table>")


def _num(x: Any, fmt: str) -> str:
    return "–" if x is None else fmt.format(x)


def spectral_section(res: dict) -> str:
    """Rotation vs rescaling of the singular structure, update cosines between methods, trajectories."""
    diag = res.get("diagnostics", {})
    parts = []
    if any(d.get("principal_angle_top_by_layer_module") for d in diag.values()):
        rows = "".join(
            f"<tr><td class=l>{html.escape(n)}</td><td>{_num(d.get('rel_update_total'), '{:.2e}')}</td>"
            f"<td>{_num(d.get('principal_angle_top'), '{:.2f}')}</td><td>{_num(d.get('principal_angle_bottom'), '{:.2f}')}</td>"
            f"<td>{_num(d.get('sv_rel_change_top'), '{:.2e}')}</td><td>{_num(d.get('sv_rel_change_bottom'), '{:.2e}')}</td>"
            f"<td>{_pct(d.get('energy_magnitude'))}</td><td>{_pct(d.get('energy_rotation'))}</td>"
            f"<td>{_pct(d.get('energy_rotation_in_span'))}</td><td>{_pct(d.get('changed_frac'))}</td></tr>"
            for n, d in diag.items())
        parts.append(
            "<h3>Rotation or rescaling?</h3><p>Per 2-D weight, the principal angles between the base's and the "
            "fine-tuned model's top-k (bottom-k) singular subspaces (k = 5% of the rank; mean of left and right, "
            "degrees), the relative change of the top-k (bottom-k) singular values, and the energy split of "
            "C = U<sub>b</sub><sup>T</sup> ΔW V<sub>b</sub> as in the reference code: magnitude energy "
            "‖diag C‖² / ‖ΔW‖²<sub>F</sub> (rescales singular values) and rotation energy "
            "(‖C‖²<sub>F</sub> − ‖diag C‖²) / ‖ΔW‖²<sub>F</sub> (turns singular vectors); on non-square "
            "matrices they leave out the part of ΔW outside the base's singular subspaces, so they need not "
            "sum to 1. In-span rotation = the off-diagonal share of ‖C‖²<sub>F</sub> alone. Unweighted means "
            "over matrices.</p>"
            "<table><tr><th class=l>model</th><th>rel. update</th><th>angle top-k (°)</th><th>angle bottom-k (°)</th>"
            "<th>top-k s.v. change</th><th>bottom-k s.v. change</th><th>magnitude energy</th><th>rotation energy</th>"
            "<th>in-span rotation</th>"
            f"<th>entries changed</th></tr>{rows}</table>")
        parts.append(_img(P.angle_curves(diag), "principal-angle curves"))
        parts += [_img(P.layer_module_heatmaps(diag, key, plot.title, cbar_label=plot.cbar, fmt=plot.fmt), key)
                  for key, plot in heatmaps() if key != "rel_update_by_layer_module"
                  and any(d.get(key) for d in diag.values())]
        if any(d.get("spectra") for d in diag.values()):
            parts.append(_img(P.spectra(diag), "singular-value spectra"))
    pairs = {k.replace("|", " vs "): v for k, v in res.get("diagnostic_pairs", {}).items()}
    if pairs:
        txt = "; ".join(f"{html.escape(k)}: {_num(v.get('cosine_total'), '{:.3f}')}" for k, v in pairs.items())
        parts.append("<h3>Do the methods move the weights the same way?</h3><p>Cosine between the two updates "
                     f"⟨ΔW<sub>a</sub>, ΔW<sub>b</sub>⟩ / (‖ΔW<sub>a</sub>‖ ‖ΔW<sub>b</sub>‖), all weights: {txt}.</p>")
        parts.append(_img(P.cosine_heatmaps(pairs), "update cosines"))
    traj = res.get("trajectories", {})
    points = [{"run": m, **p} for m, pts in traj.items() for p in pts]
    if points:
        parts.append("<h3>Over training</h3><p>Each kept checkpoint (<code>checkpoint_every</code>) against the base; "
                     "the last panel compares each checkpoint's update with the previous one's.</p>")
        parts.append(_img(P.trajectories(points), "weight trajectories"))
    return "".join(parts)


def build_report(run: Path) -> str:
    res_path = run / "results.json"
    if not res_path.is_file():
        raise UserError(f"{run}: no results.json (run a study into this directory first)")
    res = read_json(res_path)
    versions = read_json(run / "versions.json") if (run / "versions.json").is_file() else {}
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    body = [f"<h1>posttrain study <code>{html.escape(str(res['study']))}</code></h1>",
            f'<p class="meta">seed {res["seed"]} · wall time {res["wall_seconds"]:.0f}s · in-domain task '
            f'<code>{html.escape(res["id_task"])}</code> · OOD task <code>{html.escape(res["ood_task"])}</code> · '
            f'retention probes {", ".join(f"<code>{html.escape(t)}</code>" for t in res["retention_tasks"])} · '
            f'torch {html.escape(versions.get("torch", "?"))}, transformers {html.escape(versions.get("transformers", "?"))}, '
            f'git {html.escape(versions.get("git_sha", "?")[:10])}</p>']
    body.append("<h2>Accuracy</h2><p>Greedy accuracy on fixed problem sets (identical for every model); "
                "pass@k and format shares from sampled completions (temperature 1). Forgetting = mean drop of "
                "retention accuracy versus the base, in points.</p>")
    body.append(accuracy_table(res))
    body.append(_img(P.accuracy_bars(res["models"]), "accuracy by model"))
    body.append("<h2>Findings</h2><p>Each published claim is checked by the fixed rule in its text, on this "
                "run's numbers. One seed; see the README for the spread across seeds.</p>")
    body.append(findings_table(res.get("findings", [])))

    curves = {name: _read_metrics(run / "methods" / name / "metrics.jsonl") for name in res.get("training", {})}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        keys = [(f"eval/{res['id_task']}/acc", "in-domain accuracy (greedy, 64 problems)"),
                (f"eval/{res['ood_task']}/acc", "OOD accuracy (greedy, 64 problems)"), ("loss", "training loss")]
        if any("rollout/reward" in r for rows in curves.values() for r in rows):
            keys.append(("rollout/reward", "on-policy reward (rollouts)"))
        if any("kl_ref" in r for rows in curves.values() for r in rows):
            keys.append(("kl_ref", "KL to base (k1, per token, on the training batch)"))
        body.append("<h2>Training curves</h2>")
        body.append(_img(P.training_curves(curves, keys), "training curves"))
    pre = _read_metrics(run / "pretrain" / "metrics.jsonl")
    if pre:
        body.append(_img(P.training_curves({"pretrain": pre}, [("loss", "pretraining loss (all tokens)")]), "pretraining loss"))

    diag = res.get("diagnostics", {})
    if diag:
        body.append("<h2>Where the weights moved</h2><p>Relative update ‖W<sub>ft</sub> − W<sub>base</sub>‖<sub>F</sub> / "
                    "‖W<sub>base</sub>‖<sub>F</sub> per layer and module type (cells aggregate their tensors as one "
                    "concatenated weight), streamed tensor by tensor from the safetensors files.</p>")
        body.append(_img(P.layer_module_heatmaps(diag, "rel_update_by_layer_module",
                                                 "relative update ||dW|| / ||W_base|| by layer x module"),
                         "relative update heatmaps"))
        body.append(_img(P.module_bars(diag), "relative update by module"))
        body.append(spectral_section(res))
    if res.get("repairs"):
        body.append(repair_section(res))
    body.append("<h2>Example completions (in-domain)</h2>")
    body.append(examples_block(run, res))
    body.append(f"<h2>Configuration</h2><details><summary>resolved config.yaml</summary><pre>{html.escape(config)}</pre></details>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>posttrain · {html.escape(str(res['study']))}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def write_report(run: str | Path) -> Path:
    """Write RUN/report.html: a sweep's (sweep.json), a multi-seed study's or a single run's."""
    run = Path(run)
    out = run / "report.html"
    if (run / "sweep.json").is_file():
        from posttrain.report.sweep_html import build_sweep_report

        page = build_sweep_report(run)
    elif (run / "results.json").is_file() and read_json(run / "results.json").get("kind") == "seeds":
        from posttrain.report.seeds_html import build_seeds_report

        page = build_seeds_report(run)
    else:
        page = build_report(run)
    atomic_write_text(out, page)
    return out
