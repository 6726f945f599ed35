"""Write GeneralPoints (the card game of Chu et al., 2025) as JSONL files for the dataset task
configs/tasks/generalpoints.yaml: a text version of the built-in `points24` task, with its face-card
rules as the in-domain / out-of-domain split.

    python -m posttrain.tasks.generalpoints_data --out data/generalpoints

Every solvable hand (a multiset of 4 ranks) is written once: `id_train.jsonl` and `id_test.jsonl`
hold the hands under the training rule (J, Q, K count as 10), divided by hashing their values (so
no test hand, nor one with the same values, is ever trained on); `ood_test.jsonl` holds the hands
with at least one face card under the other rule (J, Q, K count as 11, 12, 13). Each row: `cards`
("K 3 5 2"), `rule` (in words), `numbers` (the card values under that rule), `target`, `solution`
(one expression, "(10+5-3)*2=24").
"""

from __future__ import annotations

import argparse
import json
import random
from itertools import combinations_with_replacement
from pathlib import Path

from posttrain.io import atomic_write_text
from posttrain.tasks.base import Problem, held_out
from posttrain.tasks.points24 import FACES, RANKS, Points24, card_value, solutions

RULE_TEXT = {"ten": "J, Q and K count as 10", "seq": "J, Q and K count as 11, 12 and 13"}


def all_hands(rule: str, n_cards: int = 4, target: int = 24) -> list[tuple[str, ...]]:
    """Every solvable hand under `rule` ("ten" or "seq"; "seq" hands hold a face card), in rank order."""
    out = []
    for hand in combinations_with_replacement(RANKS, n_cards):
        if rule == "seq" and not any(c in FACES for c in hand):
            continue
        if solutions(tuple(sorted(card_value(c, rule) for c in hand)), target):
            out.append(hand)
    return out


def rows(rule: str, holdout: float, partition: str, seed: int, n_cards: int = 4, target: int = 24) -> list[dict]:
    """The hands of one file, shuffled (cards within a hand too) by `seed`."""
    task = Points24(n_cards=n_cards, target=target)
    rng = random.Random(f"{seed}/generalpoints/{rule}/{partition}")
    out = []
    for hand in all_hands(rule, n_cards, target):
        values = tuple(sorted(card_value(c, rule) for c in hand))
        if holdout > 0 and held_out("generalpoints", (rule, values), holdout) != (partition == "test"):
            continue
        cards = list(hand)
        rng.shuffle(cards)
        p = Problem("points24", "id" if rule == "ten" else "ood", "", {"cards": cards, "rule": rule, "target": target})
        out.append({"cards": " ".join(cards), "rule": RULE_TEXT[rule], "numbers": [card_value(c, rule) for c in cards],
                    "target": target, "solution": task.solve(p, "eq")})
    rng.shuffle(out)
    return out


def write_generalpoints(out: str | Path, holdout: float = 0.1, seed: int = 0) -> dict[str, Path]:
    """Write the three JSONL files into `out`; return their paths by dataset split name."""
    out = Path(out)
    parts = {"id_train": ("ten", holdout, "train"), "id_test": ("ten", holdout, "test"), "ood_test": ("seq", 0.0, "test")}
    paths = {}
    for name, (rule, h, partition) in parts.items():
        paths[name] = out / f"{name}.jsonl"
        atomic_write_text(paths[name], "".join(json.dumps(r) + "\n" for r in rows(rule, h, partition, seed)))
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the GeneralPoints JSONL files of configs/tasks/generalpoints.yaml.")
    ap.add_argument("--out", default="data/generalpoints", help="output directory")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of in-domain hands (by values) held out for testing")
    ap.add_argument("--seed", type=int, default=0, help="order of the rows and of the cards in a hand")
    args = ap.parse_args(argv)
    for name, path in write_generalpoints(args.out, args.holdout, args.seed).items():
        print(f"{name}: {sum(1 for _ in path.open())} hands in {path}")


if __name__ == "__main__":
    main()
