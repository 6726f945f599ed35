"""Where a GRPO step's time goes in posttrain's loop: sampling, scoring, packing, the reference
forward, the policy forward, the backward and AdamW, with timers around each phase.

    .venv/bin/python bench/step_phases.py --base runs/demo/seed-0/base --steps 31 --beta 0

Same shape as bench/rollout_bench.py (16 prompts x 8 samples, at most 32 new tokens). Printed: mean
seconds per step of each phase over all steps, and the mean share of prompt groups whose advantages
were all 0 (those skip the backward when beta is 0).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/demo/seed-0/base"))
    ap.add_argument("--steps", type=int, default=31)
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (k3 in the loss)")
    args = ap.parse_args()
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {args.base}: run `make demo` first or pass --base")

    import posttrain.train.data_sources as ds
    import posttrain.train.loop as loop

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, label: str | None = None) -> None:
        f = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            key = label or name
            if name == "policy_forward":  # the reference forward is the one without autograd
                key = "policy forward" if torch.is_grad_enabled() else "reference forward"
            spent[key] += time.perf_counter() - t
            return out

        setattr(owner, name, wrapper)

    timed(ds, "generate", "sampling")
    timed(ds, "score", "scoring")
    timed(ds, "pack", "packing")
    timed(loop, "policy_forward")
    timed(torch.Tensor, "backward", "backward")
    timed(torch.optim.AdamW, "step", "adamw")

    sys.path.insert(0, str(Path(__file__).parent))
    from rollout_bench import ours

    with tempfile.TemporaryDirectory() as tmp:
        res = ours(args.base, args.steps, 16, 8, 32, 5e-5, args.beta, Path(tmp) / "run")
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    step = sum(r["step_seconds"] for r in rows) / len(rows)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; base {args.base}; {args.steps} steps, "
          f"beta {args.beta}; {res['completions'] / res['seconds']:.1f} completions/s over steps 2..{args.steps}")
    print(f"{'phase':<20} {'s per step':>10} {'share':>7}")
    for name, sec in spent.items():
        print(f"{name:<20} {sec / len(rows):>10.4f} {sec / len(rows) / step:>7.1%}")
    print(f"{'whole step':<20} {step:>10.4f}")
    zero = [r["groups_zero_adv"] for r in rows if "groups_zero_adv" in r]
    if zero:
        print(f"prompt groups with all advantages 0: {sum(zero) / len(zero):.1%} on average")


if __name__ == "__main__":
    main()
