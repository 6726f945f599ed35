"""String manipulation (reverse / sort / copy): a general-skill retention probe.

Prompt ``str rev abcd:`` answer ``dcba``. Split ``id`` uses lengths `min_len..max_len`, ``ood``
longer strings (`max_len+1..ood_len`).
"""

from __future__ import annotations

import random
import string

from posttrain.errors import UserError
from posttrain.tasks.base import MALFORMED, Problem, Task, Verdict, register_task

OPS = {"rev": lambda s: s[::-1], "sort": lambda s: "".join(sorted(s)), "copy": lambda s: s}


@register_task("strings")
class Strings(Task):
    formats = ("default",)
    splits = ("id", "ood")

    def __init__(self, min_len: int = 3, max_len: int = 6, ood_len: int = 8, alphabet: str = "abcdefghij") -> None:
        if not 1 <= min_len <= max_len < ood_len <= 40:
            raise UserError(f"strings: need 1 <= min_len <= max_len < ood_len <= 40, got {min_len}, {max_len}, {ood_len}")
        if not alphabet or any(c not in string.ascii_lowercase for c in alphabet):
            raise UserError("strings: alphabet must be non-empty lowercase ascii letters")
        self.min_len, self.max_len, self.ood_len, self.alphabet = min_len, max_len, ood_len, alphabet

    def sample(self, rng: random.Random, split: str, partition: str = "any") -> Problem:
        self.check_split(split)
        lo, hi = (self.min_len, self.max_len) if split == "id" else (self.max_len + 1, self.ood_len)
        s = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(lo, hi)))
        op = rng.choice(sorted(OPS))
        return Problem(self.name, split, f"str {op} {s}:", {"answer": OPS[op](s)})

    def solve(self, problem: Problem, fmt: str, rng: random.Random | None = None) -> str:
        self.check_format(fmt)
        return problem.data["answer"]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        if not completion or any(c not in self.alphabet for c in completion):
            return MALFORMED
        return Verdict(completion == problem.data["answer"], False, "default")
