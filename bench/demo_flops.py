"""The matrix-product floor of a study: counts the floating-point operations of every matrix
product (mm, addmm, bmm, baddbmm and the CPU attention kernels, forward and backward) that one seed
of a study performs, by running the whole study in this process under a dispatch mode that counts
them, times this core's own fp32 matrix-product rate, and prints how long those products alone would
take for N seeds on all cores if every one ran at that rate with nothing else (no elementwise work,
no Python, no I/O): a lower bound on the study's wall time.

    .venv/bin/python bench/demo_flops.py [--preset default] [--seeds 3] [--out DIR]

Counting: a product of (m x k) and (k x n) is 2mkn; attention forward is 4 B H Lq Lk D (QK^T and
PV) and its backward 10 B H Lq Lk D (the scores recomputed, then four products); masked positions
are counted, as the kernels compute them. One thread, as each seed of `make demo` runs.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _mm(a, b) -> int:
    return 2 * math.prod(a.shape[:-1]) * a.shape[-1] * b.shape[-1]


def _attention(q, k, factor: int) -> int:
    # q: [B, H, Lq, D], k: [B, Hkv, Lk, D]
    *batch, lq, d = q.shape
    return factor * math.prod(batch) * lq * k.shape[-2] * d


COUNTS = {
    aten.mm.default: lambda a: _mm(a[0], a[1]),
    aten.addmm.default: lambda a: _mm(a[1], a[2]),
    aten.bmm.default: lambda a: _mm(a[0], a[1]),
    aten.baddbmm.default: lambda a: _mm(a[1], a[2]),
    aten._scaled_dot_product_flash_attention_for_cpu.default: lambda a: _attention(a[0], a[1], 4),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: lambda a: _attention(a[1], a[2], 10),
}


class MatmulFlops(TorchDispatchMode):
    """Adds up `COUNTS` of every matrix-product operator run while active."""

    def __init__(self):
        super().__init__()
        self.flops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        count = COUNTS.get(func)
        if count is not None:
            self.flops[func.__name__.split(".")[0]] += count(args)
        return func(*args, **(kwargs or {}))


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
    """This core's fp32 matrix-product rate in FLOP/s: the best of `reps` n x n x n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the demo the floor is computed for")
    ap.add_argument("--out", type=Path, help="run directory (new); a temporary one by default")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("POSTTRAIN_NO_PROGRESS", "1")
    from posttrain.config import load_study_config, preset_path
    from posttrain.study import run_study

    cfg = load_study_config(preset_path(args.preset))
    out = args.out or Path(tempfile.mkdtemp(prefix="posttrain-flops-")) / "run"
    rate = matmul_rate()
    counter = MatmulFlops()
    stages: list[tuple[str, float]] = []

    def log(msg: str) -> None:  # the study's own stage lines, with the count so far
        if not msg.startswith(" "):
            stages.append((msg, sum(counter.flops.values())))

    t0 = time.time()
    with counter:
        run_study(cfg, out, log=log)
    wall = time.time() - t0
    total = sum(counter.flops.values())
    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}; preset {args.preset!r}, one seed on one thread, run in {out} "
          f"({wall:.0f} s with the counter on)")
    print(f"matrix-product FLOP of one seed: {total / 1e12:.2f} T ("
          + ", ".join(f"{op} {n / 1e12:.2f} T" for op, n in counter.flops.most_common()) + ")")
    marks = stages + [("(end)", total)]
    by_kind: dict[str, float] = collections.defaultdict(float)
    for (msg, at), (_, nxt) in zip(marks, marks[1:]):
        by_kind[msg.split(" ")[0].rstrip(":")] += nxt - at
    print("by stage kind: " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in by_kind.items()))
    print(f"this core's fp32 matrix-product rate (2048^3, best of 10): {rate / 1e9:.1f} GFLOP/s")
    print(f"floor for {args.seeds} seeds on {cores} cores at that rate, matrix products only: "
          f"{args.seeds * total / (cores * rate):.0f} s")


if __name__ == "__main__":
    main()
