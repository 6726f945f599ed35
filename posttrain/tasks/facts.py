"""A synthetic knowledge base memorised during pretraining: the knowledge-retention probe.

The knowledge base is a pure function of `kb_seed`, so pretraining and evaluation see the same
facts. Prompt ``fact color of zubo:``, answer ``red``. Accuracy on it after fine-tuning measures
how much memorised knowledge a method overwrote (the "knowledge benchmarks drop" of SFT).
"""

from __future__ import annotations

import random
from functools import cached_property

from posttrain.errors import UserError
from posttrain.tasks.base import MALFORMED, Problem, Task, Verdict, register_task

RELATIONS: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "black", "white", "pink", "gray", "gold"),
    "city": ("oslo", "lima", "rome", "kyiv", "baku", "doha", "riga", "bern"),
    "pet": ("cat", "dog", "owl", "fox", "yak", "eel", "ant", "bee"),
}
_CONS, _VOWELS = "bdfgklmnprstvz", "aeiou"


@register_task("facts")
class Facts(Task):
    formats = ("default",)
    splits = ("id",)

    def __init__(self, n_entities: int = 60, relations: tuple[str, ...] | list[str] = ("color", "city"), kb_seed: int = 1234) -> None:
        unknown = [r for r in relations if r not in RELATIONS]
        if unknown or not relations:
            raise UserError(f"facts: unknown relations {unknown} (known: {', '.join(RELATIONS)})")
        if not 1 <= n_entities <= 2000:
            raise UserError(f"facts: n_entities must be in 1..2000, got {n_entities}")
        self.n_entities = n_entities
        self.relations = tuple(relations)
        self.kb_seed = kb_seed

    @cached_property
    def kb(self) -> list[tuple[str, str, str]]:
        """(entity, relation, value) triples; entity names are unique pronounceable 4-letter words."""
        rng = random.Random(self.kb_seed)
        names: list[str] = []
        seen: set[str] = set()
        while len(names) < self.n_entities:
            name = "".join(rng.choice(_CONS if i % 2 == 0 else _VOWELS) for i in range(4))
            if name not in seen:
                seen.add(name)
                names.append(name)
        return [(n, rel, rng.choice(RELATIONS[rel])) for n in names for rel in self.relations]

    def sample(self, rng: random.Random, split: str, partition: str = "any") -> Problem:
        self.check_split(split)
        entity, rel, value = self.kb[rng.randrange(len(self.kb))]
        return Problem(self.name, split, f"fact {rel} of {entity}:", {"answer": value, "relation": rel})

    def all_problems(self) -> list[Problem]:
        """Every fact once: the retention probe evaluates the whole knowledge base."""
        return [Problem(self.name, "id", f"fact {rel} of {e}:", {"answer": v, "relation": rel}) for e, rel, v in self.kb]

    def solve(self, problem: Problem, fmt: str, rng: random.Random | None = None) -> str:
        self.check_format(fmt)
        return problem.data["answer"]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        if completion not in RELATIONS[problem.data["relation"]]:
            return MALFORMED
        return Verdict(completion == problem.data["answer"], False, "default")
