"""Training checkpoints that resume bit for bit.

A checkpoint `checkpoints/step-N/` is a complete HF checkpoint (config, tokenizer, safetensors) plus
`trainer_state.pt` (optimizer and scheduler state, step, RNG state: plain tensors and numbers,
read back with `torch.load(weights_only=True)`) and, for PPO, its critic: `critic/` (a separate
critic's trunk and value head; its optimizer and scheduler state are in `trainer_state.pt`) or
`value_head.safetensors` (a value head on the policy's trunk). The batch
of each step is a pure function of (seed, step), so these are all a resumed run needs to continue
exactly as an uninterrupted one would. Checkpoints are written atomically.

A run whose policy is FSDP-sharded (`train.fsdp`) writes the same files: the gathered full
weights, and the full optimizer state keyed by parameter name (`"fsdp": true` in the state), which
every process puts back into its own shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.analysis.checkpoints import Checkpoint, check_finite, step_dirs
from posttrain.errors import UserError
from posttrain.io import atomic_dir, atomic_write_text
from posttrain.models.loading import write_pretrained
from posttrain.train.fsdp import copy_into

STATE_FILE = "trainer_state.pt"
VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"


@dataclass
class CriticState:
    """A separate critic (`train.policy.Critic`, unwrapped) with its own optimizer and scheduler."""

    module: Any
    optimizer: Any
    scheduler: Any


def save_training_checkpoint(path: Path, model, tok, optimizer, scheduler, step: int, value_head=None,
                             critic: CriticState | None = None, rank_rng: list | None = None,
                             weights: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """`rank_rng`: each process's torch RNG state, in rank order, when several trained together.
    `weights`, `optimizer_state`: a sharded policy's gathered weights and full optimizer state."""
    with atomic_dir(path) as tmp:
        write_pretrained(model, tok, tmp, weights)
        state = {"format": 1, "step": step,
                 "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        if optimizer_state is not None:
            state["fsdp"] = True
        if rank_rng is not None:
            state["torch_rng_by_rank"] = list(rank_rng)
        if critic is not None:
            state |= {"critic_optimizer": critic.optimizer.state_dict(), "critic_scheduler": critic.scheduler.state_dict()}
            critic.module.save(tmp / CRITIC_DIR)
        torch.save(state, tmp / STATE_FILE)
        if value_head is not None:
            value_head.save(tmp / VALUE_HEAD_FILE)
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The resumable checkpoint with the highest step under `out_dir/checkpoints`, if any."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(step, p) for step, p in step_dirs(root) if (p / STATE_FILE).is_file()]
    return found[-1][1] if found else None


def resume_latest(out_dir: Path, model, optimizer, scheduler, metrics_path: Path, value_head=None,
                  critic: CriticState | None = None, truncate: bool = True) -> int:
    """Continue a run from its latest resumable checkpoint under `out_dir`: weights, optimizer and
    scheduler state, torch RNG state and (PPO) the value head or the separate critic with its
    optimizer and scheduler are restored and the metrics logged after that step dropped. Returns
    the checkpoint's step, or 0 when there is none. With several processes each restores its own
    RNG state and only the one that writes (`truncate`) rewrites metrics.jsonl."""
    from posttrain.train.distributed import rank, world_size
    from posttrain.train.fsdp import is_sharded, load_optimizer_state

    ck = latest_checkpoint(out_dir)
    if ck is None:
        return 0
    state = load_training_state(ck)
    by_rank = state.get("torch_rng_by_rank")
    if len(by_rank or [None]) != world_size():
        raise UserError(f"{ck} was written by {len(by_rank or [None])} process(es); resume it with as many "
                        f"(this run has {world_size()})")
    if bool(state.get("fsdp")) != is_sharded(model):
        raise UserError(f"{ck} was written by a run {'with' if state.get('fsdp') else 'without'} FSDP; resume it "
                        f"the same way (this run is {'' if is_sharded(model) else 'not '}under FSDP)")
    if hasattr(model, "load_checkpoint_weights"):  # a LoRA policy (train.lora.LoraPolicy): its adapters
        model.load_checkpoint_weights(ck)
    else:
        load_weights_into(model, ck)
    if is_sharded(model):
        load_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(by_rank[rank()] if by_rank else state["torch_rng"])
    if value_head is not None:
        if not (ck / VALUE_HEAD_FILE).is_file():
            raise UserError(f"{ck}: no {VALUE_HEAD_FILE} (was this run trained with another critic setting?)")
        value_head.load(ck / VALUE_HEAD_FILE)
    if critic is not None:
        if "critic_optimizer" not in state or not (ck / CRITIC_DIR).is_dir():
            raise UserError(f"{ck}: no separate critic (was this run trained with critic: shared?)")
        critic.module.load(ck / CRITIC_DIR)
        critic.optimizer.load_state_dict(state["critic_optimizer"])
        critic.scheduler.load_state_dict(state["critic_scheduler"])
    step = int(state["step"])
    if truncate:
        truncate_metrics(metrics_path, step)
    return step


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows of a metrics.jsonl logged after `step` (a resumed run logs them again)."""
    rows = path.read_text().splitlines() if path.is_file() else []
    atomic_write_text(path, "".join(r + "\n" for r in rows if (s := _step_of(r)) is not None and s <= step))


def _step_of(row: str) -> int | None:
    """The step of a metrics line; None for a blank or torn one (a run killed mid-write leaves its
    last line incomplete, and the resumed run logs that step again)."""
    try:
        return int(json.loads(row)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def load_weights_into(model, path: Path) -> None:
    """Copy a checkpoint's tensors into `model` in place, one tensor at a time, with the checks of
    `posttrain.models.loading.load_model`: every tensor present, none unexpected, same shapes, finite."""
    ck = Checkpoint(path)
    params = model.state_dict()  # persistent tensors only, sharing storage with the model
    names = set(ck.names())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing, unexpected = sorted(set(params) - names - tied), sorted(names - set(params))
    if missing:
        raise UserError(f"{path}: checkpoint lacks {missing[:3]}")
    if unexpected:
        raise UserError(f"{path}: checkpoint has tensors the model does not use: {unexpected[:3]}")
    for name in ck.names():
        if tuple(ck.shape(name)) != tuple(params[name].shape):
            raise UserError(f"{path}: tensor {name} has shape {list(ck.shape(name))}, the model's is {list(params[name].shape)}")
    with torch.no_grad():
        for name in ck.names():
            t = ck.get(name)
            check_finite(name, t, path)
            copy_into(params[name], t)  # a sharded (FSDP) parameter keeps its own block


def load_training_state(path: Path) -> dict:
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state file is the same user-facing problem
        raise UserError(f"{path}: unreadable {STATE_FILE} ({type(e).__name__})") from None
