"""Multi-step integer arithmetic (+, -) with three solution formats.

Prompt:  ``arith 23+45-12:``
Formats: ``direct`` ``56``                          the answer alone
         ``cot``    ``23+45=68,68-12=56``           one step per operation, left to right
         ``code``   ``x=23;x+=45;x-=12;print(x)``   a tiny program, *executed* by the verifier
The ``code`` format mirrors program-aided solutions (TinyGSM / PAL): the verifier runs the program
with a strict interpreter rather than reading a stated answer, so the format that offloads the
arithmetic is genuinely easier. Which format a model prefers is what "format collapse" measures.

Splits: ``id`` has `n_ops` operations, ``ood`` has `n_ops_ood` (longer chains). Every intermediate
value is non-negative.
"""

from __future__ import annotations

import random
import re

from posttrain.errors import UserError
from posttrain.tasks.base import MALFORMED, NUMBER, Problem, Task, Verdict, register_task

_NUM = NUMBER
_COT_STEP = re.compile(rf"{_NUM}([-+]){_NUM}={_NUM}")
_DIRECT = re.compile(_NUM)
_ASSIGN = re.compile(rf"x={_NUM}")
_UPDATE = re.compile(rf"x([-+])={_NUM}")


@register_task("arith")
class Arith(Task):
    formats = ("direct", "cot", "code")
    splits = ("id", "ood")

    def __init__(self, n_ops: int = 2, n_ops_ood: int = 3, max_operand: int = 12) -> None:
        if not 1 <= n_ops <= 8 or not 1 <= n_ops_ood <= 8:
            raise UserError(f"arith: n_ops and n_ops_ood must be in 1..8, got {n_ops}, {n_ops_ood}")
        if not 2 <= max_operand <= 10_000:
            raise UserError(f"arith: max_operand must be in 2..10000, got {max_operand}")
        self.n_ops = n_ops
        self.n_ops_ood = n_ops_ood
        self.max_operand = max_operand

    def harder_split(self, split: str) -> str | None:
        """The split with the longer chains of operations (ood by default: 3 operations against 2)."""
        other = {"id": "ood", "ood": "id"}.get(split)
        ops = {"id": self.n_ops, "ood": self.n_ops_ood}
        return other if other is not None and ops[other] > ops[split] else None

    def sample(self, rng: random.Random, split: str, partition: str = "any") -> Problem:
        self.check_split(split)
        n_ops = self.n_ops if split == "id" else self.n_ops_ood
        # the space is large: a train/test partition by hash would only cost time, so it is ignored
        while True:
            nums = [rng.randint(1, self.max_operand) for _ in range(n_ops + 1)]
            ops = [rng.choice("+-") for _ in range(n_ops)]
            value = nums[0]
            ok = True
            for op, n in zip(ops, nums[1:]):
                value = value + n if op == "+" else value - n
                ok = ok and value >= 0
            if ok:
                expr = str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(ops, nums[1:]))
                return Problem(self.name, split, f"arith {expr}:", {"nums": nums, "ops": ops, "answer": value})

    def solve(self, problem: Problem, fmt: str, rng: random.Random | None = None) -> str:
        self.check_format(fmt)
        nums, ops = problem.data["nums"], problem.data["ops"]
        if fmt == "direct":
            return str(problem.data["answer"])
        if fmt == "code":
            body = "".join(f";x{op}={n}" for op, n in zip(ops, nums[1:]))
            return f"x={nums[0]}{body};print(x)"
        steps, value = [], nums[0]
        for op, n in zip(ops, nums[1:]):
            new = value + n if op == "+" else value - n
            steps.append(f"{value}{op}{n}={new}")
            value = new
        return ",".join(steps)

    def verify(self, problem: Problem, completion: str) -> Verdict:
        answer = problem.data["answer"]
        if _DIRECT.fullmatch(completion):
            return Verdict(int(completion) == answer, False, "direct")
        if completion.startswith("x="):
            return self._verify_code(completion, answer)
        return self._verify_cot(problem, completion)

    def _verify_code(self, completion: str, answer: int) -> Verdict:
        stmts = completion.split(";")
        if len(stmts) < 2 or stmts[-1] != "print(x)":
            return MALFORMED
        m = _ASSIGN.fullmatch(stmts[0])
        if not m:
            return MALFORMED
        x = int(m.group(1))
        for stmt in stmts[1:-1]:
            m = _UPDATE.fullmatch(stmt)
            if not m:
                return MALFORMED
            x = x + int(m.group(2)) if m.group(1) == "+" else x - int(m.group(2))
        return Verdict(x == answer, False, "code")

    def _verify_cot(self, problem: Problem, completion: str) -> Verdict:
        nums, ops = problem.data["nums"], problem.data["ops"]
        parts = completion.split(",")
        parsed = []
        for part in parts:
            m = _COT_STEP.fullmatch(part)
            if not m:
                return MALFORMED
            parsed.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
        if len(parsed) != len(ops):
            return Verdict(False, False, "cot")
        ok, value = True, nums[0]
        for (a, op, b, r), qop, qn in zip(parsed, ops, nums[1:]):
            true = value + qn if qop == "+" else value - qn
            ok = ok and (a, op, b, r) == (value, qop, qn, true)
            value = true
        return Verdict(ok and parsed[-1][3] == problem.data["answer"], False, "cot")
