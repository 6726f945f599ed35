"""Run-to-run spread of the default study across seeds, and whether each method's in-domain gain
exceeds it.

    python bench/seed_spread.py                       # runs seeds 0 1 2 into runs/seed-<s> (about 12 min)
    python bench/seed_spread.py --seeds 0 1 2 --preset default --runs-dir runs
    python bench/seed_spread.py --only-report         # summarise existing runs/seed-<s> directories

A seed changes everything downstream of it: the pretraining data order and initialisation, the
fine-tuning prompt order, rollouts and evaluation problems. Spread = sample standard deviation
across seeds (and the min..max range). The verdict compares the mean gain over the base with the
spread of the method's own id_acc and with the spread of the gain itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(preset: str, seed: int, out: Path) -> None:
    cmd = [sys.executable, "-m", "posttrain.cli", "demo", "--preset", preset, "--seed", str(seed), "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} [{min(values):.3f}..{max(values):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs"))
    ap.add_argument("--only-report", action="store_true", help="do not run, summarise existing run dirs")
    args = ap.parse_args()

    results = []
    for s in args.seeds:
        out = args.runs_dir / f"seed-{s}"
        if not args.only_report:
            run(args.preset, s, out)
        results.append(json.loads((out / "results.json").read_text()))

    models = list(results[0]["models"])
    print(f"\n{args.preset} study, seeds {args.seeds}: mean ± sd [min..max]; wall "
          + ", ".join(f"{r['wall_seconds']:.0f}s" for r in results))
    print(f"{'model':<8} {'id_acc':<32} {'ood_acc':<32} {'mean retention':<32} {'forgetting':<32}")
    for m in models:
        row = [r["models"][m] for r in results]
        ret = [statistics.mean(x["retention"].values()) for x in row]
        forg = [r["forgetting"].get(m, 0.0) for r in results]
        print(f"{m:<8} {fmt([x['id_acc'] for x in row]):<32} {fmt([x['ood_acc'] for x in row]):<32} "
              f"{fmt(ret):<32} {fmt(forg):<32}")
    print("\nin-domain gain over the base (same seed):")
    for m in models:
        if m == "base":
            continue
        gains = [r["models"][m]["id_acc"] - r["models"]["base"]["id_acc"] for r in results]
        spread = statistics.stdev([r["models"][m]["id_acc"] for r in results]) if len(results) > 1 else 0.0
        gain_sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        verdict = "YES" if statistics.mean(gains) > max(spread, gain_sd) and min(gains) > 0 else "no"
        print(f"  {m:<8} gain {fmt(gains)}; id_acc spread (sd) {spread:.3f}; "
              f"gain > spread and positive for every seed: {verdict}")
    print("\nfindings that held (per seed):")
    ids = [f["id"] for f in results[0]["findings"]]
    for fid in ids:
        verdicts = [next(f["holds"] for f in r["findings"] if f["id"] == fid) for r in results]
        print(f"  {fid:<33} " + " ".join(f"{({True: 'holds', False: 'no', None: '-'}[v]):<5}" for v in verdicts))


if __name__ == "__main__":
    main()
