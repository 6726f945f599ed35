"""Cost and precision of the KL-to-base stage (posttrain/evaluation/kl.py) on a finished study's models.

    .venv/bin/python bench/kl_cost.py RUN_DIR [--config CONFIG] [--grid 64x4,128x4,64x8] [--threads 1]

CONFIG (default RUN_DIR/config.yaml) gives the methods' task splits, the seed and max_new_tokens.

For each prompts x samples setting: the base's side (sampling + scoring, shared by every model of a
task split) and each method's side (its samples, both models' log-probs), as wall and process CPU
seconds, with the per-sequence KLs and their standard errors. CPU seconds are the robust figure on a
shared machine; at one thread they approximate the wall time on an idle core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from posttrain.config import load_study_config
from posttrain.evaluation.evaluate import eval_problems
from posttrain.evaluation.kl import kl_seed, kl_to_base, sample
from posttrain.models.loading import load_model
from posttrain.study import build_tasks


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--config", type=Path, default=None, help="the study config (default: RUN/config.yaml)")
    ap.add_argument("--grid", default="64x4,128x4,64x8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_study_config(args.config or args.run / "config.yaml")
    tasks = build_tasks(cfg)
    max_new = cfg.kl.max_new_tokens or cfg.eval.max_new_tokens
    base, tok = load_model(args.run / "base", device="cpu")
    models = {n: load_model(args.run / "methods" / n / "model", device="cpu")[0] for n in cfg.methods}
    for cell in args.grid.split(","):
        P, n = (int(v) for v in cell.split("x"))
        print(f"{P} prompts x {n} samples, {args.threads} thread(s), at most {max_new} tokens")
        for name, model in models.items():
            m = cfg.methods[name]
            split = f"{m.task}/{m.split}"
            prompts = [p.prompt for p in eval_problems(tasks[m.task], m.split, P, cfg.seed)[:P]]
            bs, w, c = clock(lambda: sample(base, tok, prompts, n, max_new, kl_seed(cfg.seed, split, "base")))
            print(f"  base side ({split}): wall {w:.2f}s cpu {c:.2f}s")
            r, w, c = clock(lambda: kl_to_base(model, base, tok, bs, prompts, max_new, kl_seed(cfg.seed, split, "policy")))
            print(f"  {name}: wall {w:.2f}s cpu {c:.2f}s  KL(pi0||pi)/seq {r['kl_pi0_pi_per_seq']:.3f} "
                  f"± {r['kl_pi0_pi_per_seq_se']:.3f}  KL(pi||pi0)/seq {r['kl_pi_pi0_per_seq']:.3f} "
                  f"± {r['kl_pi_pi0_per_seq_se']:.3f}")


if __name__ == "__main__":
    main()
