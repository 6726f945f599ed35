"""SFT and GRPO at each other's learning rate, from the demo's base: in-domain accuracy, OOD,
forgetting and the last on-policy reward, to show why the default study sets them per method.

    .venv/bin/python bench/lr_sensitivity.py [--out runs/lr_sensitivity]    # ~6 min on 2 cores, after `make demo`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/lr_sensitivity"))
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "posttrain.cli", "study", str(ROOT / "configs/lr_sensitivity.yaml"),
                    "--out", str(args.out), "--resume"], check=True)
    res = json.loads((args.out / "results.json").read_text())
    base = res["models"]["base"]
    print(f"\n{'model':<14} {'id_acc':>7} {'gain':>7} {'ood_acc':>8} {'forgetting':>11} {'last rollout reward':>20}")
    for name, m in res["models"].items():
        rows = [json.loads(x) for x in (args.out / "methods" / name / "metrics.jsonl").read_text().splitlines()] \
            if name != "base" else []
        rewards = [r["rollout/reward"] for r in rows if "rollout/reward" in r]
        last = f"{sum(rewards[-10:]) / len(rewards[-10:]):.3f}" if rewards else "-"
        print(f"{name:<14} {m['id_acc']:>7.3f} {m['id_acc'] - base['id_acc']:>+7.3f} {m['ood_acc']:>8.3f} "
              f"{res['forgetting'].get(name, 0.0):>+11.3f} {last:>20}")


if __name__ == "__main__":
    main()
