"""Tasks: prompt generators with expert solvers and strict verifiers, behind a registry."""

from posttrain.tasks import arith, facts, points24, strings  # noqa: F401  (registration)
from posttrain.tasks.base import MALFORMED, TASKS, Problem, Task, Verdict, build_task, register_task

__all__ = ["MALFORMED", "TASKS", "Problem", "Task", "Verdict", "build_task", "register_task"]
