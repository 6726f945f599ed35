"""From-scratch pretraining of a tiny model on a weighted mixture of task splits and formats.

Every document is ``<bos> prompt completion <eos>`` with the loss on all tokens, as in ordinary
language-model pretraining, packed several to a row with document-local attention (no compute is
spent on padding); the formats a task is written in during pretraining are the repertoire
that post-training can later amplify or overwrite.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from posttrain.config import ModelConfig, PretrainConfig, TaskRef
from posttrain.io import atomic_write_json, atomic_write_text, versions
from posttrain.models.loading import save_checkpoint
from posttrain.models.tiny import build_char_tokenizer, build_tiny_model
from posttrain.tasks import Task
from posttrain.train.checkpointing import resume_latest, save_training_checkpoint
from posttrain.train.data_sources import step_seed
from posttrain.train.loop import make_accelerator, make_optimizer, make_scheduler, seed_everything
from posttrain.train.sequences import PackedDocs, encode_completions, encode_prompts, pack_documents


def mixture_texts(tasks: dict[str, Task], mixture: list[TaskRef], rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """Draw `n` (prompt, completion) pairs from the mixture."""
    weights = [ref.weight for ref in mixture]
    prompts, completions = [], []
    for ref in rng.choices(mixture, weights=weights, k=n):
        task = tasks[ref.task]
        problem = task.sample(rng, ref.split, "train")
        fmts = list(ref.formats) or list(task.solution_formats)
        fw = [ref.formats[f] for f in fmts] if ref.formats else None
        fmt = rng.choices(fmts, weights=fw, k=1)[0]
        prompts.append(problem.prompt)
        completions.append(task.solve(problem, fmt, rng))
    return prompts, completions


def pretrain_batch(tasks: dict[str, Task], cfg: PretrainConfig, tok, max_length: int, seed: int, step: int) -> PackedDocs:
    """Step `step`'s batch: `cfg.batch_size` documents drawn from the mixture with the step's own
    seed, encoded and packed into rows of `max_length` tokens."""
    rng = random.Random(step_seed(seed, step, "pretrain"))
    prompts, completions = mixture_texts(tasks, cfg.mixture, rng, cfg.batch_size)
    docs = [p + c for p, c in zip(encode_prompts(tok, prompts), encode_completions(tok, completions))]
    return pack_documents(docs, max_length, tok.pad_token_id)


def pretrain(
    model_cfg: ModelConfig,
    cfg: PretrainConfig,
    tasks: dict[str, Task],
    out_dir: str | Path,
    model_dir: str | Path,
    seed: int,
    device: str = "auto",
    on_step: Callable[[int, dict], None] | None = None,
    resume: bool = False,
) -> Path:
    """Pretrain and save the base checkpoint to `model_dir`; metrics, stats and the resumable
    checkpoints (every `cfg.checkpoint_every` steps) go to `out_dir`."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump({"seed": seed, "model": model_cfg.model_dump(mode="json"),
                                                               "pretrain": cfg.model_dump(mode="json")}, sort_keys=False))
    atomic_write_json(out_dir / "versions.json", versions())
    seed_everything(seed)
    tok = build_char_tokenizer()
    model = build_tiny_model(model_cfg, len(tok), seed)
    accelerator = make_accelerator(device)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup_steps, cfg.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    metrics = out_dir / "metrics.jsonl"
    start = resume_latest(out_dir, accelerator.unwrap_model(model), optimizer, scheduler, metrics) if resume else 0
    with metrics.open("a" if start else "w") as log:
        for step in range(start, cfg.steps):
            batch = pretrain_batch(tasks, cfg, tok, model_cfg.max_length, seed, step)
            dev = accelerator.device
            logits = model(input_ids=batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev),
                           attention_mask=batch.attention_mask.to(dev)).logits[:, :-1]
            mask = batch.target_mask.to(dev)
            loss_tok = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch.input_ids[:, 1:].to(dev).reshape(-1), reduction="none"
            ).view_as(mask)
            loss = (loss_tok * mask).sum() / mask.sum()
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                row = {"step": step + 1, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                if on_step:
                    on_step(step + 1, row)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_training_checkpoint(out_dir / "checkpoints" / f"step-{step + 1}", accelerator.unwrap_model(model),
                                         tok, optimizer, scheduler, step + 1)
    model_dir = save_checkpoint(accelerator.unwrap_model(model), tok, model_dir)
    atomic_write_json(out_dir / "pretrain.json", {"steps": cfg.steps, "n_params": n_params, "resumed_from_step": start or None,
                                                  "wall_seconds": time.time() - t0})
    return model_dir
