"""Run a study config and print one row per model: in-domain accuracy and gain over the base, OOD,
forgetting, in-domain sampled accuracy, the on-policy reward over the first and last 10 steps (for
methods that sample), and training time.

    .venv/bin/python bench/study_table.py configs/all_methods.yaml --out runs/all_methods
The config starts from the demo's base (`make demo` first, or --set base_model=DIR). A cell of a sweep
is a study too: `--only-report --out runs/lr_sensitivity/cells/lr=5e-05` tabulates it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--only-report", action="store_true", help="do not run, tabulate an existing run")
    args = ap.parse_args()
    if not args.only_report:
        cmd = [sys.executable, "-m", "posttrain.cli", "study", str(args.config), "--out", str(args.out), "--resume"]
        for o in args.overrides:
            cmd += ["--set", o]
        subprocess.run(cmd, check=True)
    res = json.loads((args.out / "results.json").read_text())
    base = res["models"]["base"]
    print(f"\n{res['study']} (seed {res['seed']}), in-domain {res['id_task']}, OOD {res['ood_task']}")
    print(f"{'model':<14} {'id_acc':>7} {'gain':>7} {'ood_acc':>8} {'forgetting':>11} {'id sampled':>11} "
          f"{'reward first10':>15} {'reward last10':>14} {'train s':>8}")
    for name, m in res["models"].items():
        reward_first = reward_last = "-"
        seconds = "-"
        if name != "base":
            rows = [json.loads(x) for x in (args.out / "methods" / name / "metrics.jsonl").read_text().splitlines()]
            rewards = [r["rollout/reward"] for r in rows if "rollout/reward" in r]
            if len(rewards) >= 20:
                reward_first, reward_last = f"{mean(rewards[:10]):.3f}", f"{mean(rewards[-10:]):.3f}"
            seconds = f"{res['training'][name].get('wall_seconds', 0):.0f}"
        sampled = m.get("id_sampled_acc")
        print(f"{name:<14} {m['id_acc']:>7.3f} {m['id_acc'] - base['id_acc']:>+7.3f} {m['ood_acc']:>8.3f} "
              f"{res['forgetting'].get(name, 0.0):>+11.3f} {'-' if sampled is None else f'{sampled:.3f}':>11} "
              f"{reward_first:>15} {reward_last:>14} {seconds:>8}")


if __name__ == "__main__":
    main()
