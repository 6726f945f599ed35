"""`report.html`: one self-contained page (inline CSS, plots embedded as data URIs) per run."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from posttrain.config import plain_name
from posttrain.errors import UserError
from posttrain.io import atomic_write_text, read_json
from posttrain.analysis.diagnostics import heatmaps
from posttrain.report import plots as P
from posttrain.report.schema import read_object, read_results

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
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        if isinstance(row, dict):
            rows.append(row)
    return rows


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
        if not plain_name(name) or not path.is_file():  # a name from results.json never leads out of the run
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
    rows, by_source = [], {}
    for name, r in reps.items():
        by_source.setdefault(r.get("source_model", "base"), {})[name] = r
        kept, rec, se = r.get("id_kept_frac"), r.get("ood_recovered_frac"), r.get("ood_recovered_se")
        ret = (r.get("eval") or {}).get("retention_mean")
        rec_s = _pct(rec) + ("" if rec is None or se is None else f" ± {100 * se:.0f}")
        rows.append(f'<tr><td class="l">{html.escape(name)}</td><td class="l">{html.escape(repair_operator(r))}</td>'
                    f'<td class="l">{html.escape(r.get("source_model", "base"))}</td>'
                    f'<td>{_pct(r["id_acc"])}</td><td>{_pct(r["ood_acc"])}</td>'
                    f'<td>{_pct(ret)}</td><td>{rec_s}</td><td>{_pct(kept)}</td></tr>')
    parts = []
    for src, group in by_source.items():
        first = next(iter(group.values()))
        gap, gap_se, ref = first.get("ood_gap"), first.get("ood_gap_se"), first.get("reference", src)
        if gap is not None and all(r.get("ood_recovered_frac") is None for r in group.values()):
            noise = "" if gap_se is None else f" (2 SE = {200 * gap_se:.1f} points)"
            note = (f" SFT's OOD gap to the reference is {100 * gap:+.1f} points{noise}: not a loss beyond noise, "
                    "so no recovered fraction is computed and the repair findings cannot be tested.")
        elif gap is not None and abs(gap) < 0.05:
            note = f" The OOD gap to recover is only {100 * gap:+.1f} points: recovered fractions are noisy."
        else:
            note = ""
        parts.append(f'<h3>From {html.escape(src)}</h3><p class="meta">Reference for "recovered": {html.escape(ref)} '
                     f"(OOD {_pct(first.get('reference_ood_acc'))}).{note}</p>"
                     + _img(P.recovery_curves(group), f"recovery curves from {src}"))
    skipped = "".join(f'<p class="meta">Source {html.escape(k)} skipped: {html.escape(v["skipped"])}.</p>'
                      for k, v in res.get("repair_sources", {}).items() if v.get("skipped"))
    return ("<h2>Repairing SFT's damage</h2><p>Each repair starts from the SFT model and restores part of a source "
            "model (<code>repair.source</code>: the base, or SFT's own checkpoint with the best OOD accuracy, as the "
            "reference code restores SFT_MaxOOD into SFT_END): UV-merge swaps in the source's singular directions "
            "(direction) or singular values (magnitude) for the top-k fraction of every 2-D weight's spectrum "
            "(embeddings and LM head included), with the published operator (both models' singular vectors "
            "concatenated as they are) or our QR variant (re-orthonormalised); reset-layers copies the first layers "
            "from the source (scope reference: their matrices plus the token embeddings and LM head, norms kept; "
            "scope layers: the layers whole); wise interpolates the weights. OOD recovered = "
            "(ood(repaired) − ood(SFT)) / (ood(reference) − ood(SFT)) ± its delta-method SE, the reference being the "
            "source unless <code>repair.reference</code> says otherwise, computed only when SFT lost OOD accuracy by "
            "more than twice the gap's binomial SE; in-domain gain kept = (id(repaired) − id(base)) / "
            "(id(SFT) − id(base)).</p>" + skipped + "".join(parts)
            + '<table><tr><th class="l">repair</th><th class="l">operator</th><th class="l">source</th><th>in-domain</th>'
            + "<th>OOD</th><th>retention (mean)</th><th>OOD recovered</th><th>ID gain kept</th></tr>" + "".join(rows)
            + "</table>")


def healing_section(res: dict, curves: dict[str, list[dict]]) -> str:
    """SFT's accuracy over its kept checkpoints and RL started from them (arXiv 2508.16546)."""
    ck, starts = res.get("checkpoint_evals") or {}, res.get("init_from") or {}
    if not ck and not starts:
        return ""
    peaks = res.get("peak_ood") or {}
    txt = "; ".join(f"{html.escape(m)}: step {p['step']} (OOD {_pct(p['ood_acc'])}, in-domain {_pct(p['id_acc'])})"
                    for m, p in peaks.items())
    started = "; ".join(f"{html.escape(n)} from <code>{html.escape(st['init'])}</code> (step {st['step']})"
                        for n, st in starts.items())
    return ("<h2>RL from SFT checkpoints</h2><p>Greedy accuracy of every kept checkpoint on the fixed problem sets "
            "(solid; final model last; the checkpoint with the best OOD accuracy ringed) and, dashed, the training "
            "curves of the methods that started from one of them, drawn from the step they started at."
            + (f" Peak OOD: {txt}." if txt else "") + (f" Started from another method: {started}." if started else "")
            + "</p>" + _img(P.healing_curves(ck, starts, curves, res["id_task"], res["ood_task"], peaks),
                            "accuracy over SFT checkpoints and RL from them"))


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


def _pm(v: Any, se: Any, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v) + ("" if se is None else " ± " + fmt.format(se))


def kl_section(res: dict) -> str:
    """Each model's KL to the base on its fine-tuning task, and how well it (and the weight update)
    predicts forgetting across the study's models."""
    from posttrain.analysis.predictors import PREDICTORS, points_from_results, predictor_fits

    kl = res.get("kl_to_base") or {}
    rows = "".join(
        f'<tr><td class="l">{html.escape(n)}</td><td class="l">{html.escape(str(k.get("task")))}</td>'
        + "".join(f"<td>{_pm(k.get(f'{d}_{u}'), k.get(f'{d}_{u}_se'))}</td>"
                  for d in ("kl_pi0_pi", "kl_pi_pi0") for u in ("per_seq", "per_token"))
        + f"<td>{_num(k.get('mean_tokens_pi0'), '{:.1f}')} / {_num(k.get('mean_tokens_pi'), '{:.1f}')}</td>"
        + f"<td>{_num(res.get('forgetting', {}).get(n), '{:+.3f}')}</td></tr>"
        for n, k in kl.items())
    points = points_from_results(res)
    fits = res.get("forgetting_predictors") or predictor_fits(points)
    fit_rows = "".join(f'<tr><td class="l">{html.escape(label)}</td><td>{f["n"]}</td><td>{_num(f["rho"], "{:+.2f}")}</td>'
                       f'<td>{_num(f["r2"], "{:.2f}")}</td></tr>' for key, label in PREDICTORS.items()
                       if (f := fits.get(key)))
    panels = [("kl_pi0_pi_per_seq", "KL(π0 ‖ π) per sequence"), ("kl_pi_pi0_per_seq", "KL(π ‖ π0) per sequence"),
              ("rel_update_total", "relative weight update")]
    n = len(res["kl_to_base"])
    k0 = next(iter(kl.values()))
    return ("<h2>KL to the base and forgetting</h2><p>For each trained model π and the base π0, on "
            f"{k0.get('n_prompts')} held-out prompts of the model's fine-tuning task × {k0.get('n_samples')} completions "
            f"sampled at temperature 1 (at most {k0.get('max_new_tokens')} tokens): KL(π0 ‖ π) = E<sub>y~π0</sub>[log π0(y) − log π(y)] "
            "(samples from the base; RL's Razor's predictor, which the paper calls the forward KL) and KL(π ‖ π0) = "
            "E<sub>y~π</sub>[log π(y) − log π0(y)] (samples from the fine-tuned model), per sequence (nats per completion) and "
            "per token, ± a standard error over prompts. Monte Carlo estimates: a small KL can come out slightly "
            "negative.</p><table><tr><th class=l>model</th><th class=l>task</th><th>KL(π0‖π) / seq</th>"
            "<th>KL(π0‖π) / token</th><th>KL(π‖π0) / seq</th><th>KL(π‖π0) / token</th><th>tokens (π0 / π)</th>"
            f"<th>forgetting</th></tr>{rows}</table>"
            f"<p>Across the {n} trained model{'s' * (n != 1)} of this study: Spearman ρ and R² of a least-squares line, "
            "forgetting against each predictor (RL's Razor reports R² 0.96 on its toy task and 0.71 on LLMs).</p>"
            f'<table><tr><th class="l">predictor</th><th>models</th><th>ρ</th><th>R²</th></tr>{fit_rows}</table>'
            + _img(P.forgetting_scatter(points, fits, panels), "forgetting against KL and weight update"))


def build_report(run: Path) -> str:
    res_path = run / "results.json"
    if not res_path.is_file():
        raise UserError(f"{run}: no results.json (run a study into this directory first)")
    res = read_results(res_path)
    try:
        return _render(run, res)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # the schema covers what every report shows; deeper entries (diagnostics, repairs) vary
        raise UserError(f"{res_path}: incomplete or invalid results ({type(e).__name__}: {str(e)[:200]})") from None


def _render(run: Path, res: dict) -> str:
    try:
        versions = read_json(run / "versions.json")
    except (OSError, ValueError):
        versions = {}
    versions = versions if isinstance(versions, dict) else {}
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

    curves = {name: _read_metrics(run / "methods" / name / "metrics.jsonl") for name in res.get("training", {})
              if plain_name(name)}
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
    fmts = {n: pts for n, pts in (res.get("format_trajectories") or {}).items() if pts}
    if fmts:
        body.append("<h2>Format shares over training</h2><p>Share of each output format among the completions each "
                    "RL method sampled at each step (an Expert Iteration method: at each round), by the task's format "
                    "classifier; malformed completions make up the rest (Echo Chamber, arXiv 2504.07912).</p>")
        body.append(_img(P.format_share_curves(fmts), "format shares over training"))
    body.append(healing_section(res, curves))
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
    if res.get("kl_to_base"):
        body.append(kl_section(res))
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
    elif (run / "results.json").is_file() and read_object(run / "results.json").get("kind") == "seeds":
        from posttrain.report.seeds_html import build_seeds_report

        page = build_seeds_report(run)
    else:
        page = build_report(run)
    atomic_write_text(out, page)
    return out
