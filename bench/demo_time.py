"""Wall time of `make demo` from a clean clone: clones this repository's HEAD into a fresh directory,
runs `make demo` there (virtual environment included) and prints the time of each part and the
per-seed stage times from the run's own logs.

    .venv/bin/python bench/demo_time.py [--keep DIR]

The clone is made with `git clone` of the committed HEAD (uncommitted changes are not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, help="clone into this (new) directory and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="posttrain-demo-"))
    dest = work / "posttrain"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=dest, capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VIRTUAL_ENV")}
    t0 = time.time()
    subprocess.run(["make", "venv"], cwd=dest, check=True, env=env, stdout=subprocess.DEVNULL)
    t_venv = time.time() - t0
    t1 = time.time()
    r = subprocess.run(["make", "demo"], cwd=dest, env=env, capture_output=True, text=True)
    t_demo = time.time() - t1
    (work / "demo.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.exit(f"make demo failed (exit {r.returncode}); log: {work / 'demo.log'}")
    res = json.loads((dest / "runs" / "demo" / "results.json").read_text())
    print(f"commit {sha}; {os.cpu_count()} CPUs; load average before: {os.getloadavg()}")
    print(f"make venv (clean clone): {t_venv:.0f} s")
    print(f"make demo (seeds {res['seeds']}, jobs {res.get('jobs')}): {t_demo:.0f} s wall; "
          f"seeds' own wall times sum to {res['wall_seconds']:.0f} s")
    print(f"clean clone to report: {t_venv + t_demo:.0f} s")
    for s, rel in res["runs"].items():
        run = dest / "runs" / "demo" / rel
        one = json.loads((run / "results.json").read_text())
        parts = []
        for m in sorted((run / "methods").iterdir()):
            tj = m / "train.json"
            if tj.is_file():
                parts.append(f"{m.name} {json.loads(tj.read_text())['wall_seconds']:.0f}")
        pre = run / "pretrain" / "pretrain.json"
        pre_s = f"pretrain {json.loads(pre.read_text())['wall_seconds']:.0f}, " if pre.is_file() else ""
        print(f"seed {s}: {one['wall_seconds']:.0f} s ({pre_s}training s: {', '.join(parts)})")
    print(f"run directory: {dest / 'runs' / 'demo'}")


if __name__ == "__main__":
    main()
