"""The one training loop every post-training method runs through.

A method = an objective (`train.objectives`) fed by a data source (`train.data_sources`). The
optimizer, schedule, prompt order, step budget and checkpoint format are shared, so two methods
differ only in the knobs their configs set.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from posttrain.config import TrainConfig
from posttrain.errors import UserError
from posttrain.io import atomic_write_json
from posttrain.models.loading import load_model, save_checkpoint
from posttrain.tasks import Problem, Task
from posttrain.train.data_sources import ExpertSource, OnPolicySource, prompt_schedule, score, verdict_metrics
from posttrain.train.objectives import OBJECTIVES
from posttrain.train.rollout import generate
from posttrain.train.sequences import token_logprobs


class TrainingDiverged(RuntimeError):
    """Raised when a loss or reward becomes NaN/inf; the last good checkpoint is kept."""


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the per-tensor path gives the same numbers whatever the grouping of tensors
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False)


def make_scheduler(optimizer, schedule: str, warmup: int, steps: int):
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def make_accelerator(device: str = "auto") -> Accelerator:
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    model_dir: Path
    metrics_path: Path
    steps: int
    wall_seconds: float


@torch.no_grad()
def quick_eval(model, tok, tasks: dict[str, Task], problems: dict[str, list[Problem]], max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy on small fixed problem sets, for training curves."""
    out = {}
    was_training = model.training
    model.eval()
    for key, probs in problems.items():
        task = tasks[key.split("/")[0]]
        ro = generate(model, tok, [p.prompt for p in probs], n=1, max_new_tokens=max_new_tokens, greedy=True)
        verdicts = score(task, probs, ro.texts, ro.finished)
        out[f"eval/{key}/acc"] = verdict_metrics(verdicts)["reward"]
    model.train(was_training)
    return out


def train(
    cfg: TrainConfig,
    *,
    init_dir: str | Path,
    ref_dir: str | Path | None,
    out_dir: str | Path,
    task: Task,
    expert_format: str | None,
    seed: int,
    curve_tasks: dict[str, Task] | None = None,
    curve_problems: dict[str, list[Problem]] | None = None,
    curve_every: int = 0,
    device: str = "auto",
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train one method from `init_dir`; write `out_dir/model` (final HF checkpoint),
    `out_dir/checkpoints/step-N` every `cfg.checkpoint_every` steps and `out_dir/metrics.jsonl`."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    accelerator = make_accelerator(device)
    model, tok = load_model(init_dir, device="cpu")
    ref = None
    if ref_dir is not None:
        ref, _ = load_model(ref_dir, device="cpu")
        ref.requires_grad_(False)
    objective = OBJECTIVES[cfg.objective]()
    data = cfg.data or objective.default_data
    if objective.needs_rewards and data == "expert":
        raise UserError(f"objective {cfg.objective!r} needs rewards; it cannot run on expert data")
    max_length = getattr(model.config, "max_position_embeddings", None)
    if data == "expert":
        if expert_format is None:
            raise UserError("expert data needs an expert_format")
        source = ExpertSource(task, expert_format, seed, max_length)
    else:
        source = OnPolicySource(task, seed, max_length)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, cfg.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ref is not None:
        ref = ref.to(accelerator.device)
    schedule = prompt_schedule(task, cfg.split, seed, cfg.steps, cfg.prompts_per_step)

    metrics_path = out_dir / "metrics.jsonl"
    log = metrics_path.open("w")
    curve_tasks = curve_tasks or {}

    def log_line(row: dict) -> None:
        log.write(json.dumps(row) + "\n")
        log.flush()
        if on_step:
            on_step(row["step"], row)

    if curve_every and curve_problems:
        log_line({"step": 0, **quick_eval(model, tok, curve_tasks, curve_problems, cfg.max_new_tokens)})

    model.train()
    for step in range(cfg.steps):
        ts = time.time()
        batch = source.batch(step, schedule[step], cfg.samples_per_prompt, accelerator.unwrap_model(model), tok, cfg)
        packed = batch.packed.to(accelerator.device)
        batch.packed = packed
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(ref, packed, cfg.temperature)
        logp = token_logprobs(model, packed, cfg.temperature)
        # a single update per batch: the behaviour policy is the current one, so the ratio is 1
        old_logp = logp.detach()
        out = objective.compute(logp, old_logp, ref_logp, batch, cfg)
        if not math.isfinite(float(out.loss.detach())):
            log.close()
            raise TrainingDiverged(f"non-finite loss at step {step}; last good weights are in {init_dir}")
        accelerator.backward(out.loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": float(out.loss.detach()), "lr": scheduler.get_last_lr()[0],
               "grad_norm": float(grad_norm), **out.metrics, **batch.metrics, "step_seconds": time.time() - ts}
        if curve_every and curve_problems and ((step + 1) % curve_every == 0 or step + 1 == cfg.steps):
            row.update(quick_eval(accelerator.unwrap_model(model), tok, curve_tasks, curve_problems, cfg.max_new_tokens))
        log_line(row)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(accelerator.unwrap_model(model), tok, out_dir / "checkpoints" / f"step-{step + 1}")
    log.close()
    final = accelerator.unwrap_model(model)
    model_dir = save_checkpoint(final, tok, out_dir / "model")
    if cfg.checkpoint_every:
        save_checkpoint(final, tok, out_dir / "checkpoints" / f"step-{cfg.steps}")
    result = TrainResult(model_dir, metrics_path, cfg.steps, time.time() - t0)
    atomic_write_json(out_dir / "train.json", {"steps": cfg.steps, "wall_seconds": result.wall_seconds,
                                               "objective": cfg.objective, "data": data,
                                               "expert_format": expert_format if data == "expert" else None})
    return result
