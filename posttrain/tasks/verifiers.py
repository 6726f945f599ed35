"""Answer checkers of dataset tasks, selected in YAML by `verifier: {type: NAME, ...}`.

Each checker compares the answer read from a completion with the reference answer of a dataset row
and returns True (correct), False (a readable answer that is wrong) or None (no readable answer:
the completion counts as malformed). A reference answer that the checker cannot read is the
dataset's fault, not the model's: `GoldError`, which the task reports as a one-line error naming
the row.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from posttrain.tasks.exprs import ParseError, parse_expression


class GoldError(ValueError):
    """The reference answer (or a row field the checker needs) cannot be read."""


class _Checker(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def fields(self) -> set[str]:
        """Row fields the checker reads (checked against the dataset's columns at load)."""
        return set()

    @property
    def needs_answer(self) -> bool:
        return True

    def check(self, got: str, gold: str | None, row: dict[str, Any], whole: bool) -> bool | None:
        """`got` is the completion's answer: the whole completion when `whole`, else the part the
        task's `completion.extract` regex took out of it."""
        raise NotImplementedError


# -- math_verify ----------------------------------------------------------------------------------

def _as_math(text: str) -> str:
    """A bare answer (`\\frac{1}{2}`, `1,000`) as math-verify reads it best: inside $...$, unless it
    already carries its own delimiters or a box."""
    return text if ("$" in text or "\\boxed" in text) else f"${text}$"


def _timeout(seconds: int) -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may set
    return seconds if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse_gold(text: str, timeout: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse(_as_math(text), parsing_timeout=timeout))


class MathVerify(_Checker):
    """Mathematical equivalence by the `math-verify` package (numbers, fractions, LaTeX, `\\boxed{}`,
    sets, intervals, matrices). The whole completion is searched for its final answer (boxed answers
    first, then "the answer is ...", then the last expression) unless `completion.extract` cuts it out."""

    type: Literal["math_verify"]
    timeout_seconds: int = Field(5, ge=0)  # per parse / comparison; 0: no limit
    float_rounding: int = Field(6, ge=0)
    strict: bool = True  # math-verify's strict mode: variables and relations must match too

    def check(self, got: str, gold: str | None, row: dict[str, Any], whole: bool) -> bool | None:
        from math_verify import parse, verify

        timeout = _timeout(self.timeout_seconds)
        g = _parse_gold(gold, timeout)
        if not g:
            raise GoldError(f"math-verify cannot read the reference answer {gold!r}")
        p = parse(got if whole else _as_math(got), parsing_timeout=timeout)
        if not p:
            return None
        return bool(verify(list(g), p, float_rounding=self.float_rounding, strict=self.strict, timeout_seconds=timeout))


# -- exact ----------------------------------------------------------------------------------------

class Exact(_Checker):
    """String equality after the chosen normalisations (applied to both sides)."""

    type: Literal["exact"]
    strip: bool = True
    lower: bool = False
    collapse_whitespace: bool = False  # runs of whitespace count as one space
    remove: str = ""  # characters dropped before comparing, e.g. ",$"

    def normalize(self, text: str) -> str:
        if self.remove:
            text = text.translate({ord(c): None for c in self.remove})
        if self.collapse_whitespace:
            text = re.sub(r"\s+", " ", text)
        if self.strip:
            text = text.strip()
        if self.lower:
            text = text.lower()
        return text

    def check(self, got: str, gold: str | None, row: dict[str, Any], whole: bool) -> bool | None:
        got = self.normalize(got)
        return None if not got else got == self.normalize(str(gold))


# -- regex ----------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_pattern(pattern: str, values: dict[str, Any]) -> str:
    """Replace `{name}` in a regex by the escaped value; other braces (`\\d{2,3}`) are regex syntax."""
    return _PLACEHOLDER.sub(lambda m: re.escape(str(values[m.group(1)])) if m.group(1) in values else m.group(0), pattern)


class Regex(_Checker):
    """The answer must match `pattern`, where `{answer}` stands for the reference answer and
    `{field}` for a row field (both matched literally), e.g. `'(?:the answer is )?{answer}\\.?'`."""

    type: Literal["regex"]
    pattern: str
    fullmatch: bool = True  # False: the pattern may match anywhere in the answer
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(_PLACEHOLDER.sub("x", v))
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    def fields(self) -> set[str]:
        return set(_PLACEHOLDER.findall(self.pattern)) - {"answer"}

    @property
    def needs_answer(self) -> bool:
        return "answer" in _PLACEHOLDER.findall(self.pattern)

    def check(self, got: str, gold: str | None, row: dict[str, Any], whole: bool) -> bool | None:
        rx = _compiled(fill_pattern(self.pattern, {**row, "answer": gold}), re.IGNORECASE if self.ignore_case else 0)
        return bool(rx.fullmatch(got) if self.fullmatch else rx.search(got))


@lru_cache(maxsize=65536)
def _compiled(pattern: str, flags: int) -> re.Pattern:
    return re.compile(pattern, flags)


# -- numeric --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+|[-+]?\d+/[1-9]\d*")


def read_number(text: str) -> Fraction | None:
    """An exact number from `42`, `-3.5`, `1,000` (thousands separators only), `2e3` or `3/4`;
    None for anything else."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))


def close_enough(got: Fraction, ref: Fraction, abs_tol: float, rel_tol: float) -> bool:
    """|got - ref| <= abs_tol + rel_tol * |ref|, relative to the reference (numpy.isclose's rule),
    computed on exact rationals."""
    return abs(got - ref) <= Fraction(abs_tol) + Fraction(rel_tol) * abs(ref)


class Numeric(_Checker):
    """A number within tolerance of the reference number (see `close_enough`)."""

    type: Literal["numeric"]
    abs_tol: float = Field(1e-6, ge=0)
    rel_tol: float = Field(0.0, ge=0)

    def check(self, got: str, gold: str | None, row: dict[str, Any], whole: bool) -> bool | None:
        ref = read_number(str(gold))
        if ref is None:
            raise GoldError(f"the reference answer {gold!r} is not a number")
        value = read_number(got)
        return None if value is None else close_enough(value, ref, self.abs_tol, self.rel_tol)


# -- countdown ------------------------------------------------------------------------------------

class Countdown(_Checker):
    """Countdown / GeneralPoints: an arithmetic expression (+ - * / and parentheses, spaces allowed,
    optionally followed by `=target`) that uses every number of the row's `numbers` list exactly
    once and equals the row's `target`. Parsed by `posttrain.tasks.exprs` (exact rationals, no eval)."""

    type: Literal["countdown"]
    numbers: str = "nums"  # row field: the list of numbers to use
    target: str = "target"  # row field: the value to reach

    def fields(self) -> set[str]:
        return {self.numbers, self.target}

    @property
    def needs_answer(self) -> bool:
        return False

    def _row(self, row: dict[str, Any]) -> tuple[list[int], int]:
        nums, target = row.get(self.numbers), row.get(self.target)
        if not (isinstance(nums, list) and nums and all(isinstance(x, int) and not isinstance(x, bool) for x in nums)):
            raise GoldError(f"field {self.numbers!r} is not a list of integers: {nums!r}")
        if not isinstance(target, int) or isinstance(target, bool):
            raise GoldError(f"field {self.target!r} is not an integer: {target!r}")
        return nums, target

    def check(self, got: str, gold: str | None, row: dict[str, Any], whole: bool) -> bool | None:
        nums, target = self._row(row)
        text = re.sub(r"\s+", "", got)
        lhs, eq, rhs = text.partition("=")
        if eq and not re.fullmatch(r"-?(?:0|[1-9][0-9]*)", rhs):
            return None
        try:
            parsed = parse_expression(lhs, max_len=256)
        except ParseError:
            return None
        return (sorted(parsed.numbers) == sorted(nums) and parsed.value == target
                and (not eq or int(rhs) == target))


Verifier = Annotated[Union[MathVerify, Exact, Regex, Numeric, Countdown], Field(discriminator="type")]
VERIFIERS = ("math_verify", "exact", "regex", "numeric", "countdown")
