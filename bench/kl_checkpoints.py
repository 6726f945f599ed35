"""`kl_predicts_forgetting` on the kept checkpoints of a finished study (methods x training steps).

    .venv/bin/python bench/kl_checkpoints.py RUN_DIR [--config CONFIG] [--threads 1]

The default study keeps too few final models to test the claim (2; the rule needs 6). Its kept
checkpoints (`checkpoint_every: 50`: steps 50, 100, 150 of SFT and GRPO) are six models: each is
greedy-evaluated on the study's retention sets (forgetting against the base, as in results.json),
its KLs to the base are estimated as the study's KL stage does (`kl` config), and its relative
weight update is read from results.json's trajectories. Prints each point, the fits and the verdict.
CONFIG (default RUN_DIR/config.yaml) gives the retention sets, eval and kl settings and the seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from posttrain.analysis.predictors import PREDICTORS, predictor_fits
from posttrain.config import load_study_config
from posttrain.evaluation.evaluate import eval_problems, evaluate_model
from posttrain.evaluation.kl import kl_seed, kl_to_base, sample
from posttrain.findings.kl import kl_verdict
from posttrain.models.loading import load_model
from posttrain.study import build_tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = json.loads((args.run / "results.json").read_text())
    cfg = load_study_config(args.config or args.run / "config.yaml")
    tasks = build_tasks(cfg)
    greedy = cfg.eval.model_copy(update={"n_sampled_problems": 0})
    sets = {r.key: eval_problems(tasks[r.task], r.split, cfg.eval.n_per_split, cfg.seed) for r in cfg.task_retention}
    base, tok = load_model(args.run / "base", device="cpu")

    def retention(model) -> dict[str, float]:
        return {k: v["acc"] for k, v in evaluate_model(model, tok, tasks, sets, greedy, cfg.seed).items()}

    rb = retention(base)
    max_new = cfg.kl.max_new_tokens or cfg.eval.max_new_tokens
    points, base_side = [], {}
    for name, traj in res["trajectories"].items():
        m = cfg.methods[name]
        split = f"{m.task}/{m.split}"
        prompts = [p.prompt for p in eval_problems(tasks[m.task], m.split, cfg.kl.n_prompts, cfg.seed)[: cfg.kl.n_prompts]]
        if split not in base_side:
            base_side[split] = sample(base, tok, prompts, cfg.kl.n_samples, max_new, kl_seed(cfg.seed, split, "base"))
        for point in traj:
            ckpt = args.run / "methods" / name / "checkpoints" / f"step-{point['step']}"
            if not ckpt.is_dir() and point["step"] == m.steps:  # the final model's point
                ckpt = args.run / "methods" / name / "model"
            if not ckpt.is_dir():
                print(f"skip {name}@{point['step']}: no {ckpt}")
                continue
            t = time.perf_counter()
            model, _ = load_model(ckpt, device="cpu")
            r = retention(model)
            kl = kl_to_base(model, base, tok, base_side[split], prompts, max_new, kl_seed(cfg.seed, split, "policy"))
            p = {"name": f"{name}@{point['step']}", "forgetting": sum(rb[k] - r[k] for k in rb) / len(rb),
                 "rel_update_total": point.get("rel_update_total"), **{k: kl[k] for k in PREDICTORS if k in kl}}
            points.append(p)
            print(json.dumps(p), f"({time.perf_counter() - t:.0f}s)", flush=True)
    for key, fit in predictor_fits(points).items():
        print(f"{PREDICTORS[key]}: n {fit['n']}, rho {fit['rho']}, R^2 {fit['r2']}")
    holds, evidence, _ = kl_verdict(points)
    print(f"kl_predicts_forgetting: {holds}: {evidence}")


if __name__ == "__main__":
    main()
