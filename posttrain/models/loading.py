"""Load and save any Hugging Face causal LM with its tokenizer.

The same functions serve the tiny from-scratch models and real checkpoints (a local directory or
a hub id). Remote code is off unless the caller opts in, and weights are only ever read from
safetensors or with `weights_only=True` by transformers itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from posttrain.errors import UserError
from posttrain.io import atomic_dir

# per-file "Loading weights" bars are noise next to our own progress reporting
hf_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; a clear `UserError` when the path holds neither."""
    path = str(path)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        # right padding with the EOS id is safe: padded positions are always masked out
        tok.pad_token = tok.eos_token
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model, tok


def save_checkpoint(model: PreTrainedModel, tok: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Write config, tokenizer and safetensors weights to `path`, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return path
