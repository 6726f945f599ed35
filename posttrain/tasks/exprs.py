"""A strict parser and evaluator for small arithmetic expressions (no `eval`, exact rationals).

Grammar (no whitespace anywhere):
    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := NUMBER | '(' expr ')'
    NUMBER := '0' | [1-9][0-9]*
Division by zero, unary minus, leading zeros and anything else outside the grammar are parse errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_TOKEN = re.compile(r"0|[1-9][0-9]*|[-+*/()]")


class ParseError(ValueError):
    pass


@dataclass
class Parsed:
    value: Fraction
    numbers: list[int]


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected character at {pos}: {text[pos]!r}")
        tokens.append(m.group())
        pos = m.end()
    # "012" tokenises as "0","12": reject numbers glued to a leading zero
    for a, b in zip(tokens, tokens[1:]):
        if a[0].isdigit() and b[0].isdigit():
            raise ParseError("leading zero")
    return tokens


def parse_expression(text: str, max_len: int = 64) -> Parsed:
    """Parse and evaluate `text`; return its exact value and the numbers it uses, in order."""
    if not text or len(text) > max_len:
        raise ParseError("empty or too long")
    tokens = tokenize(text)
    numbers: list[int] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ParseError("unexpected end")
        tok = tokens[pos]
        pos += 1
        return tok

    def expr() -> Fraction:
        value = term()
        while peek() in ("+", "-"):
            op = take()
            rhs = term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term() -> Fraction:
        value = factor()
        while peek() in ("*", "/"):
            op = take()
            rhs = factor()
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ParseError("division by zero")
                value = value / rhs
        return value

    def factor() -> Fraction:
        tok = take()
        if tok == "(":
            value = expr()
            if take() != ")":
                raise ParseError("expected ')'")
            return value
        if tok[0].isdigit():
            numbers.append(int(tok))
            return Fraction(int(tok))
        raise ParseError(f"unexpected token {tok!r}")

    value = expr()
    if pos != len(tokens):
        raise ParseError("trailing tokens")
    return Parsed(value=value, numbers=numbers)


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def render(node: object) -> str:
    """Render an expression tree (int | (op, left, right)) with the fewest parentheses."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node  # type: ignore[misc]
    ls, rs = render(left), render(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if not isinstance(right, int):
        rop = right[0]
        # the right operand needs parentheses when it binds looser, or equally for - and /
        if _PREC[rop] < _PREC[op] or (_PREC[rop] == _PREC[op] and op in "-/"):
            rs = f"({rs})"
    return f"{ls}{op}{rs}"


def apply_op(op: str, a: int, b: int) -> int | None:
    """Integer-only arithmetic used by solvers: None when the result is negative or not an integer."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    raise ValueError(op)
