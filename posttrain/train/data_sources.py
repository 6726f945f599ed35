"""Where training sequences come from, orthogonal to the objective that consumes them.

* ``expert``     demonstrations written by the task's solver (off-policy), in one fixed format;
* ``on_policy``  completions sampled from the current policy, scored by the task's verifier;
* ``filtered``   the policy's own samples that the verifier accepts (rejection sampling), drawn
                 once per round for all the round's prompts: with SFT this is Expert Iteration
                 (R rounds, optionally restarting from the base each round) and, with one round
                 from the base, Self-SFT.

All sources read the same prompt schedule: step t of every method sees the same prompts, so
methods differ only in what they do with them. A source is one registered class with its own
typed knobs (`Params`, field names = config keys) and a `build` constructor from the method's
config (`SourceContext` carries what the loop knows: task, seed, schedule, output directory).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from posttrain.errors import UserError
from posttrain.tasks import Problem, Task, Verdict
from posttrain.train.distributed import gather_objects, is_main, rank, rank_block, shard_range, world_size
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

    def select(self, idx: list[int]) -> "Batch":
        """The rows `idx` of the batch (for minibatches); group structure is not kept."""
        t = torch.tensor(idx, dtype=torch.long)
        p = self.packed
        sub = PackedBatch(p.input_ids[t], p.attention_mask[t], p.target_mask[t])
        width = int(sub.attention_mask.sum(-1).max())
        sub = PackedBatch(sub.input_ids[:, :width], sub.attention_mask[:, :width], sub.target_mask[:, : width - 1])
        pick = lambda x: None if x is None else x[t.to(x.device)]  # noqa: E731
        return Batch(sub, self.group_size, [self.problems[i] for i in idx], [self.texts[i] for i in idx],
                     pick(self.rewards), None if self.verdicts is None else [self.verdicts[i] for i in idx])


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


@dataclass
class SourceContext:
    """What the training loop gives a data source when it builds one."""

    task: Task
    seed: int
    max_length: int | None
    schedule: list[list[Problem]]
    out_dir: Path | None
    expert_format: str | None = None  # resolved by the caller (the study picks the base's least-used format)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


DATA_SOURCES: dict[str, type["DataSource"]] = {}


def register_source(name: str):
    """Class decorator: make a `DataSource` subclass available as `data: <name>`."""

    def deco(cls):
        if name in DATA_SOURCES:
            raise ValueError(f"data source {name!r} registered twice")
        cls.name = name
        DATA_SOURCES[name] = cls
        return cls

    return deco


class DataSource:
    """Makes the batch of step `t` from that step's prompts.

    `on_policy`: its batches are samples of the current policy (scored); `Params`: its knobs.
    """

    name: ClassVar[str] = ""
    on_policy: ClassVar[bool] = False
    # whether `batch` keeps only this process's block of the step's prompts when several
    # processes train together (`train.distributed`); the loop refuses the others then
    sharded: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = NoParams

    @classmethod
    def check(cls, cfg) -> None:
        """Cross-field validation against the method's config; raise ValueError."""

    @classmethod
    def build(cls, cfg, ctx: SourceContext) -> "DataSource":
        raise NotImplementedError

    def batch(self, step: int, problems: list[Problem], n: int, model, tok, cfg) -> Batch | None:
        raise NotImplementedError

    def round_start(self, step: int) -> bool:
        """True when `step` opens a new data round whose first act is to reset the policy."""
        return False


class ExpertParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expert_format: str | None = None  # None: the task's format the base uses least (chosen by the study)
    # the expert writes one canonical solution per problem (a consistent teacher) or a random one
    expert_solutions: Literal["canonical", "random"] = "canonical"


@register_source("expert")
class ExpertSource(DataSource):
    """`samples_per_prompt` solver demonstrations per prompt, in format `fmt` (canonical: the same
    solution each time, as a consistent teacher writes; otherwise random valid solutions).

    With `dedupe`, canonical demonstrations come once per prompt. Each prompt would hold n identical
    rows, so every loss aggregation (a mean over tokens or over sequences) and its gradient are the
    same with one row, at 1/n of the compute. Callers keep n rows when minibatches split the batch,
    because a minibatch of copies is a different sample.
    """

    Params = ExpertParams
    sharded = True

    @classmethod
    def build(cls, cfg, ctx: SourceContext) -> "ExpertSource":
        if ctx.expert_format is None:
            raise UserError("expert data needs an expert_format")
        return cls(ctx.task, ctx.expert_format, ctx.seed, ctx.max_length,
                   canonical=cfg.data_params.expert_solutions == "canonical", dedupe=cfg.minibatches == 1)

    def __init__(self, task: Task, fmt: str, seed: int, max_length: int | None, canonical: bool = True,
                 dedupe: bool = False) -> None:
        task.check_format(fmt)
        self.task, self.fmt, self.seed, self.max_length, self.canonical = task, fmt, seed, max_length, canonical
        self.dedupe = dedupe and canonical

    def batch(self, step: int, problems: list[Problem], n: int, model, tok, cfg) -> Batch:
        rng = None if self.canonical else random.Random(step_seed(self.seed, step, "expert"))
        n = 1 if self.dedupe else n
        rows = [p for p in problems for _ in range(n)]
        texts = [self.task.solve(p, self.fmt, rng) for p in rows]
        if world_size() > 1:  # every row solved as one process would (the rng runs over all), this rank's kept
            lo, hi = shard_range(len(problems), world_size(), rank())
            rows, texts = rows[lo * n : hi * n], texts[lo * n : hi * n]
        packed = pack(encode_prompts(tok, [p.prompt for p in rows]), encode_completions(tok, texts), tok.pad_token_id, self.max_length)
        return Batch(packed, n, rows, texts)


@register_source("on_policy")
class OnPolicySource(DataSource):
    """`samples_per_prompt` samples per prompt from the current policy, scored by the verifier."""

    on_policy = True
    sharded = True

    @classmethod
    def build(cls, cfg, ctx: SourceContext) -> "OnPolicySource":
        return cls(ctx.task, ctx.seed, ctx.max_length)

    def __init__(self, task: Task, seed: int, max_length: int | None) -> None:
        self.task, self.seed, self.max_length = task, seed, max_length

    def batch(self, step: int, problems: list[Problem], n: int, model, tok, cfg) -> Batch:
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, "rollout"))
        problems, shard = rank_block(problems)  # whole prompt groups, sampled as one process would
        was_training = model.training
        model.eval()
        ro = generate(model, tok, [p.prompt for p in problems], n=n, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, generator=gen, shard=shard)
        model.train(was_training)
        rows = [p for p in problems for _ in range(n)]
        verdicts = score(self.task, rows, ro.texts, ro.finished)
        rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32)
        packed = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, self.max_length, group_size=n)
        metrics = verdict_metrics(verdicts, "rollout/")
        # the format shares' denominator (analysis/format_shares.py): the step's samples over all
        # processes (equal rows each), as the metrics are averaged over processes
        metrics["rollout/samples"] = float(len(verdicts) * world_size())
        metrics["rollout/len"] = sum(len(c) for c in ro.completion_ids) / max(len(ro.completion_ids), 1)
        return Batch(packed, n, rows, ro.texts, rewards, verdicts, metrics)


class FilteredParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rounds: Annotated[int, Field(ge=1)] = 1
    restart_from_base: bool = False  # each round trains from the init weights (Echo Chamber / ReST-EM)
    filter_samples: Annotated[int, Field(ge=1)] | None = None  # k samples per prompt to filter; None: samples_per_prompt
    # drop exact duplicate (prompt, completion) pairs among the verified-correct samples of a round (Echo Chamber)
    dedupe: bool = True
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # nucleus sampling of the k samples (Echo Chamber: 0.95); 1: off


@register_source("filtered")
class FilteredSource(DataSource):
    """Verified-correct samples of the policy, generated once per round for the round's prompts.

    Each prompt gets `k` samples (temperature `temperature`, nucleus `top_p`); those the verifier
    accepts, with exact duplicate (prompt, completion) pairs of the round dropped when `dedupe`
    (Echo Chamber's `drop_duplicates` on (question, answer); rosieyzh/openrlhf-pretrain 34d239da,
    openrlhf/cli/train_ei.py), and at most `n` = samples_per_prompt per prompt (ReST-EM's cap),
    are the step's batch. Without `dedupe` the policy's most repeated answer is up-weighted by
    its multiplicity, which is the format concentration the findings measure. A step whose
    prompts yielded nothing correct returns None (no update, the schedule still moves). Round
    data is written to `out_dir/rounds/` so a resumed run trains on exactly the same data.

    Several processes split the round's sampling (each its block of prompts, with the samples one
    process would draw) and gather the samples, so every process filters the same round. What the
    filter keeps is uneven over prompts, so every process then trains on the step's whole batch:
    the sums over processes of the loss reductions (`train.distributed`) are W times the
    one-process sums in numerator and denominator alike, and the summed gradient is the
    one-process gradient, exactly (the factors are powers of two for W = 2, 4, ...). The update,
    cheap next to the round's sampling, is not split.
    """

    on_policy = True  # the policy's own (filtered) samples
    sharded = True
    Params = FilteredParams

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.data_params.rounds > cfg.steps:
            raise ValueError(f"rounds ({cfg.data_params.rounds}) cannot exceed steps ({cfg.steps})")

    @classmethod
    def build(cls, cfg, ctx: SourceContext) -> "FilteredSource":
        p = cfg.data_params
        return cls(ctx.task, ctx.seed, ctx.max_length, ctx.schedule, p.rounds, p.filter_samples or cfg.samples_per_prompt,
                   p.restart_from_base, ctx.out_dir, p.dedupe, p.top_p)

    def __init__(self, task: Task, seed: int, max_length: int | None, schedule: list[list[Problem]], rounds: int,
                 k: int, restart: bool, out_dir: Path | None, dedupe: bool = True, top_p: float = 1.0) -> None:
        self.task, self.seed, self.max_length, self.schedule = task, seed, max_length, schedule
        self.rounds, self.k, self.restart, self.out_dir = rounds, k, restart, out_dir
        self.dedupe, self.top_p = dedupe, top_p
        self.per_round = math.ceil(len(schedule) / rounds)
        self.data: dict[int, list[tuple[int, str]]] = {}  # step -> [(prompt index, completion text)]
        self.stats: dict[int, dict[str, float]] = {}

    def round_of(self, step: int) -> int:
        return step // self.per_round

    def round_start(self, step: int) -> bool:
        return self.restart and step > 0 and step % self.per_round == 0

    def _path(self, r: int) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "rounds" / f"round-{r}.json"

    def _generate_round(self, r: int, model, tok, cfg) -> None:
        from posttrain.io import atomic_write_json

        path = self._path(r)
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            self.data.update({int(k): [tuple(x) for x in v] for k, v in saved["data"].items()})
            self.stats[r] = saved["stats"]
            return
        steps = range(r * self.per_round, min((r + 1) * self.per_round, len(self.schedule)))
        flat = [(t, i, p) for t in steps for i, p in enumerate(self.schedule[t])]
        gen = torch.Generator().manual_seed(step_seed(self.seed, r, "filtered"))
        prompts, shard = rank_block([p.prompt for _, _, p in flat])  # sampled as one process would
        was_training = model.training
        model.eval()
        ro = generate(model, tok, prompts, n=self.k, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, generator=gen, top_p=self.top_p, shard=shard)
        model.train(was_training)
        texts, finished = ro.texts, ro.finished
        if shard is not None:  # every rank filters the whole round
            parts = gather_objects((texts, finished))
            texts, finished = [t for p in parts for t in p[0]], [f for p in parts for f in p[1]]
        rows = [x for x in flat for _ in range(self.k)]
        verdicts = score(self.task, [p for _, _, p in rows], texts, finished)
        kept, duplicates = 0, 0
        per_prompt: Counter = Counter()
        seen: set[tuple[str, str]] = set()
        solved: set[tuple[int, int]] = set()
        for (t, i, p), text, v in zip(rows, texts, verdicts):
            self.data.setdefault(t, [])
            if not v.correct:
                continue
            solved.add((t, i))
            if self.dedupe and (p.prompt, text) in seen:
                duplicates += 1
                continue
            seen.add((p.prompt, text))
            if per_prompt[(t, i)] < cfg.samples_per_prompt:
                self.data[t].append((i, text))
                per_prompt[(t, i)] += 1
                kept += 1
        n_correct = sum(v.correct for v in verdicts)
        self.stats[r] = {"filtered/sample_acc": n_correct / max(len(verdicts), 1),
                         "filtered/prompts_solved": len(solved) / max(len(flat), 1),
                         "filtered/kept": float(kept),
                         "filtered/duplicate_frac": duplicates / max(n_correct, 1),
                         # the formats of all k samples the round drew (format collapse over rounds)
                         "filtered/round": float(r), "filtered/samples": float(len(verdicts)),
                         **{k: v for k, v in verdict_metrics(verdicts, "filtered/").items() if "/format/" in k}}
        if path is not None and is_main():
            atomic_write_json(path, {"data": {str(t): self.data.get(t, []) for t in steps}, "stats": self.stats[r]})

    def batch(self, step: int, problems: list[Problem], n: int, model, tok, cfg) -> Batch | None:
        r = self.round_of(step)
        if r not in self.stats:
            self._generate_round(r, model, tok, cfg)
        items = self.data.get(step, [])
        if not items:
            return None
        rows = [problems[i] for i, _ in items]
        texts = [text for _, text in items]
        packed = pack(encode_prompts(tok, [p.prompt for p in rows]), encode_completions(tok, texts),
                      tok.pad_token_id, self.max_length)
        return Batch(packed, 1, rows, texts, metrics={**self.stats[r], "filtered/batch": float(len(items))})

