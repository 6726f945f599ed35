"""Are fresh training runs bitwise identical? Runs `posttrain train` N times with the same config,
seed and thread count, one after another, and compares every tensor of the final weights (and the
value head, for PPO) bit for bit, and the per-step metrics (step_seconds aside).

    .venv/bin/python bench/determinism_check.py --base runs/demo/base --runs 3 --threads 2 \\
        --set methods.grpo.steps=24 --set methods.grpo.lr=3e-4

`--set` is passed to `posttrain train` as is (e.g. `--set methods.grpo.objective=rloo` for RLOO on
the same method). Prints one line per run (sha256 of the weights, wall seconds) and a verdict;
exits 1 when any run differs from the first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in load_file(str(run / "model" / "model.safetensors")).items()}
    if (run / "value_head.safetensors").is_file():
        out.update({f"value_head/{k}": v for k, v in load_file(str(run / "value_head.safetensors")).items()})
    return out


def digest(ts: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(ts):
        h.update(k.encode())
        h.update(ts[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]


def first_difference(a: list[dict], b: list[dict]) -> str | None:
    for ra, rb in zip(a, b):
        if ra != rb:
            keys = sorted(k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k))
            return f"step {ra.get('step')}: " + ", ".join(f"{k} {ra.get(k)!r} vs {rb.get(k)!r}" for k in keys[:3])
    return None if len(a) == len(b) else f"{len(a)} vs {len(b)} metric rows"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=Path("runs/demo/base"))
    ap.add_argument("--config", type=Path, default=ROOT / "posttrain" / "presets" / "default.yaml")
    ap.add_argument("--method", default="grpo")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--keep", type=Path, default=None, help="write the runs here instead of a temporary folder")
    args = ap.parse_args()
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {args.base}: run `make demo` first or pass --base")

    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1",
           **{k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    print(f"torch {torch.__version__}; {args.runs} runs of {args.method} on {args.base}, {args.threads} threads; "
          f"--set {' '.join(args.sets) or '(none)'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        runs, first = [], None
        for i in range(args.runs):
            out = root / f"run{i}"
            cmd = [sys.executable, "-m", "posttrain.cli", "train", str(args.config), "--method", args.method,
                   "--base", str(args.base), "--out", str(out), *[x for s in args.sets for x in ("--set", s)]]
            t = time.time()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"run {i} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
            ts, ms = tensors(out), metrics(out)
            if first is None:
                first = (ts, ms)
            differ = sorted(k for k in first[0] if not torch.equal(first[0][k], ts[k]))
            note = "" if i == 0 else (f"; {len(differ)} of {len(ts)} tensors differ from run 0" if differ
                                      else "; weights identical to run 0")
            mdiff = None if i == 0 else first_difference(first[1], ms)
            if mdiff:
                note += f"; metrics first differ at {mdiff}"
            print(f"run {i}: weights {digest(ts)}  {time.time() - t:.0f}s{note}", flush=True)
            runs.append(not differ and mdiff is None)
    same = all(runs)
    print(f"identical: {'yes' if same else 'NO'} ({sum(runs)} of {len(runs)} runs match run 0 bit for bit)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
