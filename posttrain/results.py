"""Assemble `results.json` (the contract in docs/architecture.md) from a study's stage outputs."""

from __future__ import annotations

import json
from typing import Any

from posttrain.config import LmEvalRef, StudyConfig, TaskRef


def model_entry(cfg: StudyConfig, scores: dict[str, dict]) -> dict[str, Any]:
    """The per-model record: accuracies, retention per probe, format shares of the in-domain task."""
    id_s, ood_s = scores[cfg.id_task.key], scores[cfg.ood_task.key]
    labels = [retention_label(r) for r in cfg.retention]
    retention = {lab if labels.count(lab) == 1 else r.key: scores[r.key]["acc"] for lab, r in zip(labels, cfg.retention)}
    return {
        "id_acc": id_s["acc"],
        "ood_acc": ood_s["acc"],
        "retention": retention,
        "format_share": {k: v for k, v in id_s["format_share"].items()},
        "id_malformed": id_s["malformed"],
        "ood_malformed": ood_s["malformed"],
        "id_sampled_acc": id_s.get("sampled_acc"),
        "ood_sampled_acc": ood_s.get("sampled_acc"),
        "id_pass_at_k": id_s.get("pass_at_k", {}),
        "ood_pass_at_k": ood_s.get("pass_at_k", {}),
    }


def problem_counts(cfg: StudyConfig, scores: dict[str, dict]) -> dict[str, Any]:
    """How many problems each accuracy was measured on (the same for every model of a study): the
    basis of the findings' binomial noise rule. None where an evaluation did not report it."""
    labels = [retention_label(r) for r in cfg.retention]
    return {"id": scores[cfg.id_task.key].get("n"), "ood": scores[cfg.ood_task.key].get("n"),
            "retention": {lab if labels.count(lab) == 1 else r.key: scores[r.key].get("n")
                          for lab, r in zip(labels, cfg.retention)}}


def retention_label(ref: TaskRef | LmEvalRef) -> str:
    """A retention probe's name in results.json: the task ("facts", "mmlu"); its key when two share it."""
    return ref.lm_eval if isinstance(ref, LmEvalRef) else ref.task


def forgetting(base: dict[str, Any], model: dict[str, Any]) -> float:
    """Mean drop of retention accuracy versus the base (positive = forgot)."""
    drops = [base["retention"][k] - model["retention"][k] for k in base["retention"]]
    return sum(drops) / len(drops) if drops else 0.0


def training_summary(run, name: str) -> dict[str, Any]:
    path = run.method(name) / "train.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def assemble_results(cfg: StudyConfig, evals: dict[str, dict], diagnostics: dict[str, dict], run,
                     wall_seconds: float, diag_extra: dict | None = None) -> dict[str, Any]:
    from posttrain.analysis.diagnostics import results_keys
    from posttrain.analysis.format_shares import read_format_series

    models = {name: model_entry(cfg, scores) for name, scores in evals.items()}
    keys = results_keys()
    return {
        "study": cfg.name,
        "seed": cfg.seed,
        "wall_seconds": round(wall_seconds, 2),
        "id_task": cfg.id_task.key,
        "ood_task": cfg.ood_task.key,
        "retention_tasks": [r.key for r in cfg.retention],
        "models": models,
        "n_problems": problem_counts(cfg, evals["base"]),
        "forgetting": {n: forgetting(models["base"], m) for n, m in models.items() if n != "base"},
        # the per-model aggregates the diagnostics table marks for results.json; the per-tensor
        # tables stay in diagnostics/diff/
        "diagnostics": {name: {k: d[k] for k in keys if k in d} for name, d in diagnostics.items()},
        # cosine of two methods' updates (dW_a, dW_b), "a|b" -> PairSummary JSON
        "diagnostic_pairs": (diag_extra or {}).get("pairs", {}),
        # per method: diagnostics of each step-<N> checkpoint against the base
        "trajectories": (diag_extra or {}).get("trajectory", {}),
        "training": {name: training_summary(run, name) for name in cfg.methods},
        # per on-policy / Expert Iteration method: the format shares of its samples over training steps
        "format_trajectories": {name: pts for name in cfg.methods
                                if (pts := read_format_series(run.method(name) / "metrics.jsonl"))},
        "repairs": {},
        # per method with evaluated kept checkpoints: [{step, id_acc, ood_acc}] (final model last) and
        # the point with the best OOD accuracy; where methods started from another one's checkpoint
        "checkpoint_evals": {},
        "peak_ood": {},
        "init_from": {},
        "repair_sources": {},
        "findings": [],
    }
