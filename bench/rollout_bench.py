"""GRPO throughput (rollout + update, completions per second): posttrain's loop vs TRL's GRPOTrainer
on the identical tiny model, prompts, batch shape and completion budget, side by side in one run.

    .venv/bin/pip install trl            # bench-only dependency (not needed by posttrain)
    .venv/bin/python bench/rollout_bench.py --base runs/demo/seed-0/base --steps 12 --repeats 5 --beta 0 0.04

Both sides: 16 prompts x 8 samples = 128 completions per optimizer step, at most 32 new tokens,
temperature 1, one update per batch (mu = 1), AdamW, the same learning rate and KL coefficient
(`--beta`, k3 estimator in the loss). At beta 0 TRL never runs its reference model, while posttrain
still runs the frozen reference forward to *measure* KL, as it always does; with beta > 0 both sides
do the same work. The first step of each side is warm-up and not timed. Rewards come from the same
strict points24 verifier.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def ours(base: Path, steps: int, prompts: int, group: int, max_new: int, lr: float, beta: float, out: Path) -> dict:
    from posttrain.config import TrainConfig
    from posttrain.tasks import build_task
    from posttrain.train.loop import train

    cfg = TrainConfig(objective="grpo", task="points24", steps=steps, prompts_per_step=prompts, samples_per_prompt=group,
                      max_new_tokens=max_new, lr=lr, kl_coef=beta, kl_estimator="k3", kl_mode="loss", trackers=["none"])
    res = train(cfg, init_dir=base, ref_dir=base, out_dir=out, task=build_task("points24"), expert_format=None,
                seed=0, device="cpu")
    rows = [json.loads(line) for line in res.metrics_path.read_text().splitlines()][1:]
    timed = rows[1:]  # step 1 is warm-up
    secs = sum(r["step_seconds"] for r in timed)
    lens = [r["rollout/len"] for r in timed]
    return {"seconds": secs, "completions": len(timed) * prompts * group, "mean_len": sum(lens) / len(lens),
            "reward": sum(r["rollout/reward"] for r in timed) / len(timed)}


def trl_side(base: Path, steps: int, prompts: int, group: int, max_new: int, lr: float, beta: float,
             out: Path) -> dict:
    import random

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models.loading import load_model
    from posttrain.tasks import build_task
    from posttrain.train.data_sources import prompt_schedule

    task = build_task("points24")
    schedule = prompt_schedule(task, "id", 0, steps, prompts)
    problems = {p.prompt: p for step in schedule for p in step}
    # identical prompt order; "<bos>" is the tokenizer's special token, as posttrain prepends it
    data = Dataset.from_list([{"prompt": "<bos>" + p.prompt} for step in schedule for p in step])
    model, tok = load_model(base)
    lens: list[float] = []
    rewards: list[float] = []

    def reward(prompts, completions, **kw):
        out = []
        for p, c in zip(prompts, completions):
            text = c.split(tok.eos_token)[0]
            out.append(task.verify(problems[p.removeprefix("<bos>")], text).reward)
            lens.append(len(text) + 1)
        rewards.extend(out)
        return out

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=prompts * group, num_generations=group,
                      gradient_accumulation_steps=1, max_completion_length=max_new, temperature=1.0, beta=beta,
                      num_iterations=1, learning_rate=lr, lr_scheduler_type="constant", max_steps=steps,
                      use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
                      bf16=False, shuffle_dataset=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    random.seed(0)
    trainer.train()
    secs = stamps[-1] - stamps[0]  # steps 2..N
    per_step = prompts * group
    return {"seconds": secs, "completions": (len(stamps) - 1) * per_step,
            "mean_len": sum(lens[per_step:]) / max(len(lens[per_step:]), 1),
            "reward": sum(rewards[per_step:]) / max(len(rewards[per_step:]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/demo/seed-0/base"), help="a pretrained tiny checkpoint")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.04],
                    help="KL coefficients of both sides (k3 in the loss), each measured; above 0 TRL runs its "
                         "reference model too")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of each side, each in a fresh process")
    ap.add_argument("--side", choices=("posttrain", "trl"), help=argparse.SUPPRESS)  # one run, JSON on stdout
    args = ap.parse_args()
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {args.base}: run `make demo` first or pass --base")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: .venv/bin/pip install trl") from None
    if args.side:
        shape = (args.steps, args.prompts, args.group, args.max_new_tokens, args.lr, args.beta[0])
        with tempfile.TemporaryDirectory() as tmp:
            side = ours if args.side == "posttrain" else trl_side
            result = side(args.base, *shape, Path(tmp) / "run")
        print("RESULT " + json.dumps(result))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, trl {trl.__version__}; base {args.base}; "
          f"{args.prompts} prompts x {args.group} samples, <= {args.max_new_tokens} new tokens, {args.steps} steps")
    # Each run is a fresh process (a second training in one process runs a few percent slower, and
    # TRL's Trainer must not leave state behind for ours), and the sides and betas alternate so that
    # a slow spell of a shared machine lands on all of them rather than on one.
    runs: dict[tuple[float, str], list[dict]] = {(b, side): [] for b in args.beta for side in ("posttrain", "trl")}
    common = ["--base", str(args.base), "--steps", str(args.steps), "--prompts", str(args.prompts),
              "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr)]
    for _ in range(args.repeats):
        for (beta, side), results in runs.items():
            proc = subprocess.run([sys.executable, __file__, *common, "--beta", str(beta), "--side", side],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{side} run (beta {beta}) failed:\n{proc.stderr[-2000:]}")
            results.append(json.loads(line[0].removeprefix("RESULT ")))
    for beta in args.beta:
        rate = {side: [x["completions"] / x["seconds"] for x in runs[(beta, side)]] for side in ("posttrain", "trl")}
        print(f"\nbeta {beta}" + (" (TRL runs no reference model; posttrain still measures KL)" if beta == 0 else
                                  " (both sides run the reference model)"))
        width = max(8 * args.repeats - 1, len("completions/s per run"))
        print(f"{'':<10} {'completions/s per run':>{width}} {'median':>8} {'mean tokens':>12} {'mean reward':>12}")
        for side, r in rate.items():
            rs = runs[(beta, side)]
            per = " ".join(f"{v:7.1f}" for v in r)
            print(f"{side:<10} {per:>{width}} {statistics.median(r):>8.1f} {rs[0]['mean_len']:>12.1f} "
                  f"{rs[0]['reward']:>12.3f}")
        ratios = [a / b for a, b in zip(rate["posttrain"], rate["trl"])]
        print(f"posttrain / TRL per repeat: {' '.join(f'{x:.2f}x' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
