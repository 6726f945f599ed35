"""Per-module mutation scores from mutmut's results in mutants/ (run by bench/mutation.sh).

score = (killed + timeout) / (mutants - equivalent). "no tests" (no selected test calls the
function) and "survived" count against the score; equivalent mutants are the names listed in
bench/mutation_equivalent.txt (one per line, '#' starts a comment giving the reason).

    python bench/mutation_score.py [module.py ...] [--survivors]
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "killed", None: "not checked"}


def equivalent() -> set[str]:
    path = ROOT / "bench" / "mutation_equivalent.txt"
    names = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        name = line.split("#", 1)[0].strip()
        if name:
            names.add(name)
    return names


def main(argv: list[str]) -> int:
    show = "--survivors" in argv
    modules = [a for a in argv if not a.startswith("--")]
    if not modules:
        modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    eq = equivalent()
    rows, total = [], Counter()
    survivors = []
    for path in modules:
        meta = ROOT / "mutants" / (path + ".meta")
        if not meta.is_file():
            rows.append((path, None))
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        c = Counter()
        for name, code in codes.items():
            if name in eq:
                c["equivalent"] += 1
                continue
            status = STATUS.get(code, "suspicious")
            c[status] += 1
            if status in ("survived", "no tests", "suspicious", "not checked"):
                survivors.append(f"{name}: {status}")
        rows.append((path, c))
        total += c
    print(f"{'module':42s} {'killed':>7s} {'total':>6s} {'score':>7s}  survived  no-tests  timeout  equivalent")
    for path, c in rows + [("ALL", total)]:
        if c is None:
            print(f"{path:42s}  (not run)")
            continue
        killed = c["killed"] + c["timeout"]
        n = sum(v for k, v in c.items() if k != "equivalent")
        score = f"{100 * killed / n:6.1f}%" if n else "    -"
        print(f"{path:42s} {killed:7d} {n:6d} {score}  {c['survived']:8d}  {c['no tests']:8d}  {c['timeout']:7d}  "
              f"{c['equivalent']:10d}")
    if show:
        print("\n".join(sorted(survivors)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
