"""Compare two studies' results.json: are models, forgetting, findings, diagnostics (and more) identical?

    python bench/compare_results.py runs/before/results.json runs/after/results.json [--sections models,forgetting,...]

Prints, per section, "identical" or every differing leaf with both values and, for numbers, the absolute
difference; ends with the largest absolute difference over all numeric leaves. Exit code 0 when every
compared section is identical, 1 otherwise. Wall times and paths are not compared.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_SECTIONS = ("models", "forgetting", "findings", "diagnostics", "diagnostic_pairs", "trajectories", "repairs")
IGNORED = {"wall_seconds", "path", "cached", "step_seconds"}


def leaves(x, prefix=""):
    """(dotted path, value) of every leaf of a JSON value; list items are indexed, dict keys sorted."""
    if isinstance(x, dict):
        for k in sorted(x):
            if k not in IGNORED:
                yield from leaves(x[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(a, b) -> tuple[list[str], float]:
    la, lb = dict(leaves(a)), dict(leaves(b))
    diffs, worst = [], 0.0
    for key in sorted(set(la) | set(lb)):
        va, vb = la.get(key, "<missing>"), lb.get(key, "<missing>")
        if va == vb or (isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb)):
            continue
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            d = abs(va - vb)
            worst = max(worst, d)
            diffs.append(f"  {key}: {va!r} vs {vb!r} (|diff| {d:.3g})")
        else:
            diffs.append(f"  {key}: {va!r} vs {vb!r}")
    return diffs, worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS))
    ap.add_argument("--max-lines", type=int, default=40, help="differences shown per section")
    args = ap.parse_args()
    ra, rb = (json.loads(p.read_text()) for p in (args.before, args.after))
    same, worst = True, 0.0
    for section in args.sections.split(","):
        diffs, w = compare(ra.get(section), rb.get(section))
        worst = max(worst, w)
        if not diffs:
            print(f"{section}: identical")
            continue
        same = False
        print(f"{section}: {len(diffs)} differing values (largest |diff| {w:.3g})")
        print("\n".join(diffs[: args.max_lines]) + ("\n  ..." if len(diffs) > args.max_lines else ""))
    print("all compared sections identical" if same else f"differences found; largest numeric |diff| {worst:.3g}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
