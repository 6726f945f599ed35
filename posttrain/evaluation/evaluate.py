"""Evaluation on verifiable tasks: greedy accuracy, sampled pass@k, format shares, malformed share.

Problem sets are a function of (task, split, n, seed) only, so every model of a study is scored on
exactly the same problems. Held-out problems (the "test" partition) are used where a task has one.
"""

from __future__ import annotations

import random
from collections import Counter
from math import comb

import torch

from posttrain.config import EvalConfig
from posttrain.tasks import Problem, Task
from posttrain.train.data_sources import score
from posttrain.train.rollout import generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def eval_problems(task: Task, split: str, n: int, seed: int) -> list[Problem]:
    """The fixed evaluation set of a task split (the whole knowledge base for `facts`; up to `n`
    distinct held-out rows for a dataset task)."""
    if hasattr(task, "eval_set"):
        return task.eval_set(split, n, seed)
    if hasattr(task, "all_problems"):
        return task.all_problems()
    rng = random.Random(f"{seed}/eval/{task.name}/{split}")
    return [task.sample(rng, split, "test") for _ in range(n)]


def _shares(verdicts) -> dict[str, float]:
    n = max(len(verdicts), 1)
    counts = Counter(v.format if v.format else "malformed" for v in verdicts)
    return {k: counts[k] / n for k in sorted(counts)}


@torch.no_grad()
def evaluate_split(model, tok, task: Task, problems: list[Problem], cfg: EvalConfig, seed: int) -> dict:
    """Scores of one model on one task split."""
    ro = generate(model, tok, [p.prompt for p in problems], n=1, max_new_tokens=cfg.max_new_tokens,
                  greedy=True, batch_size=cfg.batch_size)
    verdicts = score(task, problems, ro.texts, ro.finished)
    n = len(problems)
    out = {
        "n": n,
        "acc": sum(v.correct for v in verdicts) / n,
        "malformed": sum(v.malformed for v in verdicts) / n,
        "format_share_greedy": _shares(verdicts),
        "examples": [{"prompt": p.prompt, "completion": t, "correct": v.correct}
                     for p, t, v in list(zip(problems, ro.texts, verdicts))[:5]],
    }
    m = min(cfg.n_sampled_problems, n)
    if m:
        gen = torch.Generator().manual_seed(random.Random(f"{seed}/sample/{task.name}/{problems[0].split}").getrandbits(63))
        sub = problems[:m]
        so = generate(model, tok, [p.prompt for p in sub], n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, generator=gen, batch_size=cfg.batch_size)
        rows = [p for p in sub for _ in range(cfg.n_samples)]
        sv = score(task, rows, so.texts, so.finished)
        correct = [sum(v.correct for v in sv[i * cfg.n_samples : (i + 1) * cfg.n_samples]) for i in range(m)]
        out["sampled_acc"] = sum(correct) / (m * cfg.n_samples)
        out["pass_at_k"] = {str(k): sum(pass_at_k(cfg.n_samples, c, k) for c in correct) / m for k in cfg.pass_k}
        out["format_share"] = _shares(sv)
        out["sampled_malformed"] = sum(v.malformed for v in sv) / len(sv)
    else:
        out["format_share"] = out["format_share_greedy"]
    return out


def evaluate_model(model, tok, tasks: dict[str, Task], problem_sets: dict[str, list[Problem]], cfg: EvalConfig, seed: int) -> dict:
    """Scores on every `task/split` key of `problem_sets`."""
    model.eval()
    return {key: evaluate_split(model, tok, tasks[key.split("/")[0]], probs, cfg, seed) for key, probs in problem_sets.items()}
