"""Training checkpoints that resume bit for bit.

A checkpoint `checkpoints/step-N/` is a complete HF checkpoint (config, tokenizer, safetensors) plus
`trainer_state.pt` (optimizer and scheduler state, step, RNG state: plain tensors and numbers,
read back with `torch.load(weights_only=True)`) and, for PPO, `value_head.safetensors`. The batch
of each step is a pure function of (seed, step), so these are all a resumed run needs to continue
exactly as an uninterrupted one would. Checkpoints are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.analysis.checkpoints import Checkpoint, step_dirs
from posttrain.errors import UserError
from posttrain.io import atomic_dir, atomic_write_text

STATE_FILE = "trainer_state.pt"
VALUE_HEAD_FILE = "value_head.safetensors"


def save_training_checkpoint(path: Path, model, tok, optimizer, scheduler, step: int, value_head=None) -> Path:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        torch.save({"format": 1, "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / STATE_FILE)
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


def resume_latest(out_dir: Path, model, optimizer, scheduler, metrics_path: Path, value_head=None) -> int:
    """Continue a run from its latest resumable checkpoint under `out_dir`: weights, optimizer and
    scheduler state, torch RNG state and (PPO) the value head are restored and the metrics logged
    after that step dropped. Returns the checkpoint's step, or 0 when there is none."""
    ck = latest_checkpoint(out_dir)
    if ck is None:
        return 0
    load_weights_into(model, ck)
    state = load_training_state(ck)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if value_head is not None:
        value_head.load(ck / VALUE_HEAD_FILE)
    step = int(state["step"])
    truncate_metrics(metrics_path, step)
    return step


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows of a metrics.jsonl logged after `step` (a resumed run logs them again)."""
    rows = path.read_text().splitlines() if path.is_file() else []
    atomic_write_text(path, "".join(r + "\n" for r in rows if r.strip() and json.loads(r)["step"] <= step))


def load_weights_into(model, path: Path) -> None:
    """Copy a checkpoint's tensors into `model` in place, one tensor at a time."""
    ck = Checkpoint(path)
    params = model.state_dict()  # persistent tensors only, sharing storage with the model
    missing = set(params) - set(ck.names())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if missing - tied:
        raise UserError(f"{path}: checkpoint lacks {sorted(missing - tied)[:3]}")
    with torch.no_grad():
        for name in ck.names():
            if name in params:
                params[name].copy_(ck.get(name).to(params[name].dtype))


def load_training_state(path: Path) -> dict:
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state file is the same user-facing problem
        raise UserError(f"{path}: unreadable {STATE_FILE} ({type(e).__name__})") from None
