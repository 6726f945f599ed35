"""The README's seed table and findings list, printed from a multi-seed study's own aggregated
results.json (what `make demo` writes to runs/demo), so the README quotes the product, not a bench copy.

    .venv/bin/python bench/readme_tables.py runs/demo

Rows: every model, mean ± sample sd [min..max] over the seeds; forgetting of each trained model; the
in-domain gain over the same seed's base; then every finding with its multi-seed verdict and held_in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(node, digits: int = 3) -> str:
    if not isinstance(node, dict) or "values" not in node:
        return "–" if node is None else f"{node:.{digits}f}"
    vals = [v for v in node["values"] if isinstance(v, (int, float))]
    if not vals:
        return "–"
    sd = node.get("sd")
    sd_s = "" if sd is None else f" ± {sd:.{digits}f}"
    return f"{node['mean']:.{digits}f}{sd_s} [{min(vals):.{digits}f}..{max(vals):.{digits}f}]"


def gains(res: dict, model: str) -> str:
    base = res["models"]["base"]["id_acc"]["values"]
    own = res["models"][model]["id_acc"]["values"]
    d = [a - b for a, b in zip(own, base) if isinstance(a, (int, float)) and isinstance(b, (int, float))]
    if not d:
        return "–"
    m = sum(d) / len(d)
    sd = (sum((x - m) ** 2 for x in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else 0.0
    return f"{m:+.3f} ± {sd:.3f} [{min(d):+.3f}..{max(d):+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a multi-seed run directory (its results.json has kind: seeds)")
    args = ap.parse_args()
    res = json.loads((args.run / "results.json").read_text())
    if res.get("kind") != "seeds":
        raise SystemExit(f"{args.run}/results.json is not a multi-seed study's")
    print(f"seeds {res['seeds']}; {res.get('elapsed_seconds', res['wall_seconds']):.0f} s elapsed "
          f"({res['wall_seconds']:.0f} s summed over seeds, jobs {res.get('jobs', 1)})\n")
    print("| model | in-domain acc | gain over base | OOD acc | mean retention | forgetting |")
    print("|---|---|---|---|---|---|")
    for name, m in res["models"].items():
        ret = m.get("retention") or {}
        per = [r["values"] for r in ret.values() if isinstance(r, dict) and "values" in r]
        mean_ret = None
        if per:
            cols = list(zip(*per))
            vals = [sum(c) / len(c) for c in cols]
            mu = sum(vals) / len(vals)
            sd = (sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
            mean_ret = {"mean": mu, "sd": sd, "values": vals}
        forg = res.get("forgetting", {}).get(name)
        print(f"| {name} | {cell(m['id_acc'])} | {'–' if name == 'base' else gains(res, name)} | {cell(m['ood_acc'])} "
              f"| {cell(mean_ret)} | {'–' if forg is None else cell(forg)} |")
    print("\n| finding | verdict | held in | evidence (multi-seed) |")
    print("|---|---|---|---|")
    for f in res["findings"]:
        verdict = {True: "holds", False: "does not hold", None: "cannot tell"}[f["holds"]]
        ev = str(f.get("evidence", "")).replace("|", "/").replace("\n", " ")
        print(f"| `{f['id']}` | {verdict} | {f['held_in']} | {ev[:300]} |")


if __name__ == "__main__":
    main()
