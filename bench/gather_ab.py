"""A/B of the shared-prefix gather's backward: autograd's `x[index]` (index_put_ with accumulate,
atomics at >1 thread) against `policy.gather_rows` (index_add_ in index order), on the batches of
a real GRPO run, alternating the two versions so that a shared, noisy machine hurts both alike.

    .venv/bin/python bench/gather_ab.py --base runs/demo/base --threads 2 --rounds 9

Batches: 16 prompts x 8 samples sampled from the base (at most 32 new tokens), as in
bench/step_phases.py; by default 7 of the 16 groups carry a gradient and the others run without
autograd, as in a GRPO step where 9 groups have all advantages 0 (an odd number of groups puts the
boundary between the two threads' halves of the old accumulate inside a group). Timed per round and version: the policy forward + backward of every batch
(the part of a GRPO step the change touches; sampling and AdamW are unchanged). Printed: median
and spread of wall time over rounds, the median CPU time of the process (all threads; less
sensitive to other jobs taking the cores, though spin-waiting threads count), and whether the two
versions' gradients (of the last batch, per round) are bitwise equal, and how many different
gradients each version gave over the rounds (1 = reproducible).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/demo/base"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--live", type=int, default=7,
                    help="prompt groups with a gradient, as when the others' advantages are all 0 (0: all 16)")
    args = ap.parse_args()
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {args.base}: run `make demo` first or pass --base")
    torch.set_num_threads(args.threads)

    import posttrain.train.policy as policy
    from posttrain.models.loading import load_model
    from posttrain.tasks import build_task
    from posttrain.train.data_sources import prompt_schedule
    from posttrain.train.rollout import generate
    from posttrain.train.sequences import pack

    model, tok = load_model(args.base, device="cpu")
    task = build_task("points24")
    schedule = prompt_schedule(task, "id", 0, args.batches, 16)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for problems in schedule:
        ro = generate(model, tok, [p.prompt for p in problems], n=8, max_new_tokens=32, generator=gen)
        batches.append(pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, group_size=8))
    weights = [torch.randn(b.target_mask.shape, generator=gen) for b in batches]

    live = list(range(args.live)) if args.live else None
    versions = {"x[index] (before)": lambda x, i: x[i], "gather_rows (after)": policy.gather_rows}

    def run(gather) -> tuple[float, float, str]:
        policy.gather_rows = gather
        t, c = time.perf_counter(), time.process_time()
        for b, w in zip(batches, weights):
            model.zero_grad(set_to_none=True)
            (policy.policy_forward(model, b, grad_groups=live).logp * w * b.target_mask).sum().backward()
        wall, cpu_sec = time.perf_counter() - t, time.process_time() - c
        h = hashlib.sha256()  # the last batch's gradient
        for p in model.parameters():
            h.update(p.grad.numpy().tobytes())
        return wall, cpu_sec, h.hexdigest()

    saved = policy.gather_rows
    times: dict[str, list[float]] = {k: [] for k in versions}
    cpu: dict[str, list[float]] = {k: [] for k in versions}
    grads: dict[str, list[str]] = {k: [] for k in versions}
    for name, fn in versions.items():  # warm-up
        run(fn)
    for _ in range(args.rounds):
        for name, fn in versions.items():
            sec, csec, digest = run(fn)
            grads[name].append(digest)
            times[name].append(sec / len(batches))
            cpu[name].append(csec / len(batches))
    policy.gather_rows = saved
    shape = f"{tuple(batches[0].input_ids.shape)} rows x tokens, shared {tuple(batches[0].shared.input_ids.shape)}"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; base {args.base}; "
          f"{len(batches)} GRPO batches (first: {shape}); {args.live or 'all'} groups with a gradient; "
          f"{args.rounds} alternating rounds")
    for name, ts in times.items():
        print(f"{name:<22} forward+backward per batch: wall median {statistics.median(ts) * 1e3:7.1f} ms "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}); CPU time of all threads median "
              f"{statistics.median(cpu[name]) * 1e3:.1f} ms; {len(set(grads[name]))} distinct gradient(s) over "
              f"{args.rounds} rounds")
    a, b = grads.values()
    print(f"the two versions' gradients bitwise equal in every round: {a == b}")


if __name__ == "__main__":
    main()
