"""Sampler speed with and without the decode-mask shortcut (`posttrain.train.rollout`): at decode
steps the sampler hands sdpa its own 4-D padding mask instead of letting transformers rebuild the
mask at every token. Both ways must draw the same tokens; the script checks that and times them.

    .venv/bin/python bench/sampler_bench.py --base runs/demo/seed-0/base --batches 12 --repeats 10

One batch = the GRPO shape of the default study: 16 prompts x 8 samples, at most 32 new tokens,
temperature 1. The two ways alternate, `--repeats` times each, over the same `--batches` prompt sets
and seeds; printed: seconds per batch, their medians, and the saving within each back-to-back pair.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/demo/seed-0/base"))
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {args.base}: run `make demo` first or pass --base")

    import posttrain.train.rollout as rollout
    from posttrain.models.loading import load_model
    from posttrain.tasks import build_task
    from posttrain.train.data_sources import prompt_schedule

    model, tok = load_model(args.base)
    model.eval()
    schedule = prompt_schedule(build_task("points24"), "id", 0, args.batches, args.prompts)
    shortcut = rollout._takes_bool_mask

    def run(use_shortcut: bool) -> tuple[float, list]:
        rollout._takes_bool_mask = shortcut if use_shortcut else (lambda m: False)
        drawn, t0 = [], time.perf_counter()
        for i, problems in enumerate(schedule):
            ro = rollout.generate(model, tok, [p.prompt for p in problems], n=args.group,
                                  max_new_tokens=args.max_new_tokens, generator=torch.Generator().manual_seed(i))
            drawn.append(ro.completion_ids)
        return (time.perf_counter() - t0) / len(schedule), drawn

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; base {args.base}; shortcut live: "
          f"{shortcut(model)}; {args.prompts} prompts x {args.group} samples, <= {args.max_new_tokens} new tokens")
    run(True)  # warm-up
    times: dict[str, list[float]] = {"transformers mask": [], "4-D mask shortcut": []}
    samples = {}
    for _ in range(args.repeats):
        for name, use in (("transformers mask", False), ("4-D mask shortcut", True)):
            sec, drawn = run(use)
            times[name].append(sec)
            samples[name] = drawn
    rollout._takes_bool_mask = shortcut
    for name, ts in times.items():
        print(f"{name:<20} s per batch: {' '.join(f'{t:.4f}' for t in ts)}; median {statistics.median(ts):.4f}")
    same = samples["transformers mask"] == samples["4-D mask shortcut"]
    # each repeat runs the two ways back to back: the paired saving is robust to the machine's drift
    saved = [100 * (a - b) / a for a, b in zip(times["transformers mask"], times["4-D mask shortcut"])]
    print(f"identical samples: {same}; shortcut faster in {sum(x > 0 for x in saved)} of {len(saved)} pairs, "
          f"median paired saving {statistics.median(saved):.1f}% of sampling time")


if __name__ == "__main__":
    main()
