"""Where training sequences come from, orthogonal to the objective that consumes them.

* ``expert``     demonstrations written by the task's solver (off-policy), in one fixed format;
* ``on_policy``  completions sampled from the current policy, scored by the task's verifier.

All sources read the same prompt schedule: step t of every method sees the same prompts, so
methods differ only in what they do with them.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from posttrain.tasks import Problem, Task, Verdict
from posttrain.train.rollout import generate
from posttrain.train.sequences import PackedBatch, encode_completions, encode_prompts, pack


def step_seed(seed: int, step: int, salt: str) -> int:
    """A per-step seed, so that resuming at step t needs no saved RNG stream."""
    return random.Random(f"{seed}/{salt}/{step}").getrandbits(63)


def prompt_schedule(task: Task, split: str, seed: int, steps: int, per_step: int) -> list[list[Problem]]:
    """The prompts of every step; a function of (task, split, seed, steps, per_step) only."""
    rng = random.Random(f"{seed}/prompts/{task.name}/{split}")
    return [[task.sample(rng, split, "train") for _ in range(per_step)] for _ in range(steps)]


@dataclass
class Batch:
    packed: PackedBatch
    group_size: int
    problems: list[Problem]  # one per sequence
    texts: list[str]
    rewards: torch.Tensor | None = None  # [N] when scored
    verdicts: list[Verdict] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def score(task: Task, problems: list[Problem], texts: list[str], finished: list[bool]) -> list[Verdict]:
    from posttrain.tasks import MALFORMED

    # an unfinished completion (no EOS within budget) is malformed whatever its prefix says
    return [task.verify(p, t) if f else MALFORMED for p, t, f in zip(problems, texts, finished)]


def verdict_metrics(verdicts: list[Verdict], prefix: str = "") -> dict[str, float]:
    n = max(len(verdicts), 1)
    out = {
        f"{prefix}reward": sum(v.reward for v in verdicts) / n,
        f"{prefix}malformed": sum(v.malformed for v in verdicts) / n,
    }
    for fmt, c in Counter(v.format for v in verdicts if v.format).items():
        out[f"{prefix}format/{fmt}"] = c / n
    return out


class ExpertSource:
    """`samples_per_prompt` solver demonstrations per prompt, in format `fmt`."""

    on_policy = False

    def __init__(self, task: Task, fmt: str, seed: int, max_length: int | None) -> None:
        task.check_format(fmt)
        self.task, self.fmt, self.seed, self.max_length = task, fmt, seed, max_length

    def batch(self, step: int, problems: list[Problem], n: int, model, tok, cfg) -> Batch:
        rng = random.Random(step_seed(self.seed, step, "expert"))
        rows = [p for p in problems for _ in range(n)]
        texts = [self.task.solve(p, self.fmt, rng) for p in rows]
        packed = pack(encode_prompts(tok, [p.prompt for p in rows]), encode_completions(tok, texts), tok.pad_token_id, self.max_length)
        return Batch(packed, n, rows, texts)


class OnPolicySource:
    """`samples_per_prompt` samples per prompt from the current policy, scored by the verifier."""

    on_policy = True

    def __init__(self, task: Task, seed: int, max_length: int | None) -> None:
        self.task, self.seed, self.max_length = task, seed, max_length

    def batch(self, step: int, problems: list[Problem], n: int, model, tok, cfg) -> Batch:
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, "rollout"))
        was_training = model.training
        model.eval()
        ro = generate(model, tok, [p.prompt for p in problems], n=n, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, generator=gen)
        model.train(was_training)
        rows = [p for p in problems for _ in range(n)]
        verdicts = score(self.task, rows, ro.texts, ro.finished)
        rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32)
        packed = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, self.max_length)
        metrics = verdict_metrics(verdicts, "rollout/")
        metrics["rollout/len"] = sum(len(c) for c in ro.completion_ids) / max(len(ro.completion_ids), 1)
        return Batch(packed, n, rows, ro.texts, rewards, verdicts, metrics)


DATA_SOURCES: dict[str, Callable[..., object]] = {"expert": ExpertSource, "on_policy": OnPolicySource}
