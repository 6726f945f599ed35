"""GeneralPoints, the card game of "SFT Memorizes, RL Generalizes" (Chu et al., 2025), sized for a
tiny model.

Given `n_cards` cards, write an arithmetic expression that uses each card's value exactly once and
equals `target`. The rule for face cards is part of the prompt:
  * split ``id``:  J, Q, K all count as 10 (the training rule);
  * split ``ood``: J, Q, K count as 11, 12, 13 and every problem holds at least one face card, so
    a model that memorised "face = 10" fails.
With `holdout` > 0, that share of hands (value multisets, per rule) is never used for training and
evaluation uses only those, to separate memorised hands from a learned search.

Prompt:   ``pts K 3 5 2 JQK=10 t24:``
Formats:  ``eq``     ``(10+5-3)*2=24``           (one expression, fewest parentheses, then ``=target``)
          ``steps``  ``10+5=15,15-3=12,12*2=24``  (one binary operation per step on available numbers)
Both are verified exactly: the numbers used must be the card values (as a multiset) and the value
must equal the target (exact rationals for ``eq``; every ``steps`` result must be stated correctly).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from functools import lru_cache

from posttrain.errors import UserError
from posttrain.tasks.base import MALFORMED, NUMBER, Problem, Task, Verdict, register_task
from posttrain.tasks.exprs import ParseError, apply_op, parse_expression, render

RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
FACES = ("J", "Q", "K")
RULE_TAG = {"ten": "JQK=10", "seq": "JQK=11,12,13"}
_STEP = re.compile(rf"{NUMBER}([-+*/]){NUMBER}={NUMBER}")


def card_value(card: str, rule: str) -> int:
    if card == "A":
        return 1
    if card in FACES:
        return 10 if rule == "ten" else 11 + FACES.index(card)
    return int(card)


@lru_cache(maxsize=200_000)
def solutions(values: tuple[int, ...], target: int) -> tuple[tuple[tuple[int, str, int, int], ...], ...]:
    """All step sequences (a, op, b, result) over non-negative integers that reach `target`.

    Commutative operations are written larger-operand first so each solution has one spelling.
    """
    found: list[tuple[tuple[int, str, int, int], ...]] = []

    def search(pool: tuple[int, ...], steps: tuple[tuple[int, str, int, int], ...]) -> None:
        if len(pool) == 1:
            if pool[0] == target:
                found.append(steps)
            return
        seen: set[tuple[int, str, int]] = set()
        for i in range(len(pool)):
            for j in range(len(pool)):
                if i == j:
                    continue
                a, b = pool[i], pool[j]
                rest = tuple(pool[k] for k in range(len(pool)) if k not in (i, j))
                for op in "+-*/":
                    if op in "+*" and a < b:
                        continue
                    if (a, op, b) in seen:
                        continue
                    seen.add((a, op, b))
                    r = apply_op(op, a, b)
                    if r is None or r > 10 * max(target, 1) + 100:
                        continue
                    search(tuple(sorted(rest + (r,))), steps + ((a, op, b, r),))

    search(tuple(sorted(values)), ())
    return tuple(found)


def steps_to_expression(values: tuple[int, ...], steps: tuple[tuple[int, str, int, int], ...]) -> str:
    """Turn a step sequence into one expression with the fewest parentheses."""
    pool: list[tuple[int, object]] = [(v, v) for v in values]
    for a, op, b, r in steps:
        ia = next(k for k, (v, _) in enumerate(pool) if v == a)
        na = pool.pop(ia)[1]
        ib = next(k for k, (v, _) in enumerate(pool) if v == b)
        nb = pool.pop(ib)[1]
        pool.append((r, (op, na, nb)))
    assert len(pool) == 1
    return render(pool[0][1])


@register_task("points24")
class Points24(Task):
    formats = ("eq", "steps")
    splits = ("id", "ood")

    def __init__(self, n_cards: int = 4, target: int = 24, holdout: float = 0.0, max_tries: int = 10_000) -> None:
        if not 2 <= n_cards <= 5:
            raise UserError(f"points24: n_cards must be in 2..5, got {n_cards}")
        if not 1 <= target <= 200:
            raise UserError(f"points24: target must be in 1..200, got {target}")
        if not 0.0 <= holdout < 1.0:
            raise UserError(f"points24: holdout must be in [0, 1), got {holdout}")
        self.test_fraction = holdout  # hands (as value multisets) never used for training
        self.n_cards = n_cards
        self.target = target
        self.max_tries = max_tries

    def sample(self, rng: random.Random, split: str, partition: str = "any") -> Problem:
        self.check_split(split)
        rule = "ten" if split == "id" else "seq"
        for _ in range(self.max_tries):
            cards = [rng.choice(RANKS) for _ in range(self.n_cards)]
            if split == "ood" and not any(c in FACES for c in cards):
                continue
            values = tuple(card_value(c, rule) for c in cards)
            if not self.sample_in(rng, split, partition, lambda: (rule, tuple(sorted(values)))):
                continue
            if solutions(tuple(sorted(values)), self.target):
                prompt = f"pts {' '.join(cards)} {RULE_TAG[rule]} t{self.target}:"
                return Problem(self.name, split, prompt, {"cards": cards, "rule": rule, "target": self.target})
        raise UserError(f"points24: no solvable hand found for n_cards={self.n_cards}, target={self.target}")

    def _values(self, problem: Problem) -> tuple[int, ...]:
        return tuple(card_value(c, problem.data["rule"]) for c in problem.data["cards"])

    def solve(self, problem: Problem, fmt: str, rng: random.Random | None = None) -> str:
        self.check_format(fmt)
        values = self._values(problem)
        sols = solutions(tuple(sorted(values)), problem.data["target"])
        # rng=None is the canonical expert: always the first solution of the enumeration
        steps = sols[0] if rng is None else sols[rng.randrange(len(sols))]
        if fmt == "steps":
            return ",".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)
        return f"{steps_to_expression(tuple(sorted(values)), steps)}={problem.data['target']}"

    def verify(self, problem: Problem, completion: str) -> Verdict:
        values = sorted(self._values(problem))
        target = problem.data["target"]
        if "," in completion or (completion.count("=") > 1):
            return self._verify_steps(completion, values, target)
        if completion.count("=") != 1:
            return MALFORMED
        lhs, rhs = completion.split("=")
        if not re.fullmatch(NUMBER, rhs):
            return MALFORMED
        try:
            parsed = parse_expression(lhs)
        except ParseError:
            return MALFORMED
        ok = int(rhs) == target and sorted(parsed.numbers) == values and parsed.value == Fraction(target)
        return Verdict(correct=ok, malformed=False, format="eq")

    def _verify_steps(self, completion: str, values: list[int], target: int) -> Verdict:
        pool = list(values)
        parts = completion.split(",")
        if len(parts) != len(values) - 1:
            return MALFORMED
        ok = True
        for part in parts:
            m = _STEP.fullmatch(part)
            if not m:
                return MALFORMED
            a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            true = {"+": a + b, "-": a - b, "*": a * b, "/": Fraction(a, b) if b else None}[op]
            if true is None or true != r:
                ok = False  # a wrong step is a wrong answer, not a malformed one
            for x in (a, b):
                if x in pool:
                    pool.remove(x)
                else:
                    ok = False
            pool.append(r)
        ok = ok and pool == [target]
        return Verdict(correct=ok, malformed=False, format="steps")
