"""Task interface and registry.

A task is a prompt generator, an expert solver (for demonstrations, in one of several solution
formats) and a strict verifier. Verifiers never guess: an answer that does not parse exactly as one
of the task's formats is *malformed*, scores 0 and is counted as malformed, so format drift shows
up in the metrics instead of being hidden by a lenient parser.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from posttrain.errors import UserError


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt shown to the model and what the verifier needs."""

    task: str
    split: str
    prompt: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A verifier's judgement of one completion."""

    correct: bool
    malformed: bool
    format: str | None  # the solution format the completion parsed as, None when malformed

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


MALFORMED = Verdict(correct=False, malformed=True, format=None)

# Numbers in answers have at most this many digits; a longer one is outside every task's grammar
# (malformed). Python refuses to convert integers of more than 4300 digits, and no answer of these
# tasks comes close to 64.
MAX_DIGITS = 64
NUMBER = rf"(0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"  # one capturing group


class Task:
    """Base class. Subclasses set `name`, `formats`, `splits` and implement the three methods.

    Parameters come in as keyword arguments from the study config (`world.tasks.<name>`); a
    subclass validates them in `__init__` and raises `UserError` for bad values.
    """

    name: ClassVar[str] = ""
    formats: ClassVar[tuple[str, ...]] = ("default",)
    splits: ClassVar[tuple[str, ...]] = ("id",)

    def __init__(self, **params: Any) -> None:
        if params:
            raise UserError(f"task {self.name!r} got unknown parameters: {sorted(params)}")

    def harder_split(self, split: str) -> str | None:
        """The split of this task that is a harder version of `split` (the same problems with more
        steps), or None: what `rl_easy_to_hard` (findings/learning_transfer.py) asks of a task."""
        return None

    # -- to implement -------------------------------------------------------------------------
    def sample(self, rng: random.Random, split: str, partition: str = "any") -> Problem:
        """Draw one problem of `split`. `partition` is "train", "test" or "any" (see `held_out`)."""
        raise NotImplementedError

    def solve(self, problem: Problem, fmt: str, rng: random.Random | None = None) -> str:
        """An expert completion for `problem` in solution format `fmt`: a random one of the valid
        solutions when `rng` is given, else the canonical (deterministic) one."""
        raise NotImplementedError

    def verify(self, problem: Problem, completion: str) -> Verdict:
        """Strictly parse and check `completion`."""
        raise NotImplementedError

    @property
    def solution_formats(self) -> tuple[str, ...]:
        """The formats `solve` can write: every format for a task with a solver; for a dataset task
        the formats of its reference solutions (none: it cannot be used for SFT on expert data)."""
        return self.formats

    # -- shared helpers -----------------------------------------------------------------------
    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise UserError(f"task {self.name!r} has no split {split!r} (has: {', '.join(self.splits)})")

    def check_format(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise UserError(f"task {self.name!r} has no format {fmt!r} (has: {', '.join(self.formats)})")

    def sample_in(self, rng: random.Random, split: str, partition: str, key: Callable[[], tuple]) -> bool:
        """True when the problem identified by `key()` belongs to `partition` (always, when the task
        holds nothing out)."""
        if partition == "any" or self.test_fraction <= 0:
            return True
        held = held_out(self.name, key(), self.test_fraction)
        return held if partition == "test" else not held

    test_fraction: float = 0.0  # share of problem identities held out of training ("test" partition)


def held_out(task: str, key: tuple, fraction: float) -> bool:
    """Deterministic train/test assignment of a problem identity by hashing (stable across runs)."""
    digest = hashlib.sha256(repr((task, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a task to the registry under `name`."""

    def deco(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def build_task(name: str, params: dict[str, Any] | None = None) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    cls = TASKS[name]
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(params or {}) - accepted)
    if unknown:
        raise UserError(f"task {name!r} has no parameter(s) {', '.join(unknown)} (has: {', '.join(sorted(accepted))})")
    return cls(**(params or {}))
