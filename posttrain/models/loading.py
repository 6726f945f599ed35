"""Load and save any Hugging Face causal LM with its tokenizer: the one loading path of every command.

`load_model` serves the tiny from-scratch models and real checkpoints (a local directory or a hub
id, see `posttrain.models.hub`) alike, and checks before trusting a checkpoint what `diff` and
`repair` check (`posttrain.analysis.checkpoints`):

- the weight files open (no truncated or corrupt safetensors, no garbage header, no missing shard);
- pickle-only weights are refused unless `allow_pickle`, and then read with `weights_only=True`;
- every tensor has the shape the model's config implies, no tensor is missing (transformers would
  initialise it randomly) and none is unexpected (a renamed tensor is both);
- every weight is finite.
Any failure is a one-line `UserError` naming the checkpoint and the tensor. Remote code is off
unless the caller opts in.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase,
                          PreTrainedTokenizerFast)
from transformers.utils import logging as hf_logging

from posttrain.analysis.checkpoints import Checkpoint, check_finite
from posttrain.devices import resolve_device  # noqa: F401 - the resolver's historical home; callers import it from here
from posttrain.errors import UserError
from posttrain.io import atomic_dir
from posttrain.models.chat import set_chat_mode
from posttrain.models.hub import resolve_checkpoint

# per-file "Loading weights" bars are noise next to our own progress reporting
hf_logging.disable_progress_bar()

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# what transformers raises for a checkpoint it cannot read (after our own checks passed)
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError, json.JSONDecodeError)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers prints a multi-line load report for mismatches; ours is the one-line error."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _first_line(e: BaseException) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _shown(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def open_checkpoint(path: str | Path, allow_pickle: bool | None = None) -> tuple[Path, Checkpoint]:
    """Resolve `path` to a local checkpoint directory and open its weights; `UserError` unless it
    has a readable config.json and readable weight files."""
    local = resolve_checkpoint(path)
    if not local.is_dir():
        raise UserError(f"{path}: is a file, not a Hugging Face checkpoint directory")
    cfg_file = local / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file}: not a JSON object")
    return local, Checkpoint(local, allow_pickle=allow_pickle)


def _expected_shapes(config, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    """Parameter shapes the config implies, from a weightless (meta-device) instance of the model."""
    try:
        with torch.device("meta"), _quiet():
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - without it the load report below still catches mismatches
        return {}
    return {n: tuple(t.shape) for n, t in meta.state_dict().items()}


def _tokenizer_class(local: Path):
    """The class that reads this checkpoint's tokenizer. transformers 5 picks the tokenizer of the
    model type (Qwen2Tokenizer for a qwen2 config) even when tokenizer_config.json names the generic
    fast tokenizer, and that class rebuilds its own pre-tokenizer: a tiny world's character
    tokenizer saved with a qwen2 model came back dropping spaces. The generic name is honoured."""
    try:
        named = json.loads((local / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        named = None
    return PreTrainedTokenizerFast if named in ("TokenizersBackend", "PreTrainedTokenizerFast") else AutoTokenizer


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool | None = None,
    chat_template: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer after checking the checkpoint (module docstring).

    `dtype`: auto (the checkpoint's), fp32, bf16 or fp16. `allow_pickle`: read pickle-only weights
    (None: as `posttrain.analysis.checkpoints.pickle_allowed` says; off by default). `chat_template`:
    whether prompts are wrapped in the tokenizer's chat template (`posttrain.models.chat`)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (auto, fp32, bf16 or fp16)")
    dev = resolve_device(device)
    local, ck = open_checkpoint(path, allow_pickle)
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as e:
        hint = " (pass --trust-remote-code only if you trust its code)" if "trust_remote_code" in str(e) else ""
        raise UserError(f"{path}: cannot read config.json: {_first_line(e)}{hint}") from None
    try:
        with _quiet():
            tok = _tokenizer_class(local).from_pretrained(local, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions on bad files
        raise UserError(f"{path}: cannot load the tokenizer: {_first_line(e)}") from None
    expected = _expected_shapes(config, trust_remote_code)
    for name in ck.names():
        if name in expected and tuple(ck.shape(name)) != expected[name]:
            raise UserError(f"{path}: tensor {name} has shape {list(ck.shape(name))} but the model's config.json "
                            f"implies {list(expected[name])}")
    try:
        with _quiet():
            model, info = AutoModelForCausalLM.from_pretrained(
                local, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                output_loading_info=True, weights_only=True)
    except _LOAD_ERRORS as e:
        raise UserError(f"cannot load model from {path}: {_first_line(e)}") from None
    # a missing tensor would be silently random-initialised, an unexpected one silently dropped
    if info.get("missing_keys"):
        raise UserError(f"{path}: the checkpoint lacks tensor(s) the model needs: {_shown(info['missing_keys'])}"
                        + (f"; it has unexpected {_shown(info['unexpected_keys'])}" if info.get("unexpected_keys") else ""))
    if info.get("unexpected_keys"):
        raise UserError(f"{path}: the checkpoint has tensor(s) the model does not use: {_shown(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        raise UserError(f"{path}: tensor(s) with the wrong shape: {_shown(str(k[0] if isinstance(k, tuple) else k) for k in info['mismatched_keys'])}")
    if info.get("error_msgs"):
        raise UserError(f"cannot load model from {path}: {_first_line(info['error_msgs'][0])}")
    for name, t in model.state_dict().items():
        check_finite(name, t, path)
    if tok.pad_token_id is None:
        # right padding with the EOS id is safe: padded positions are always masked out
        tok.pad_token = tok.eos_token
    set_chat_mode(tok, chat_template)
    model.to(dev)
    model.eval()
    return model, tok


def write_pretrained(model: PreTrainedModel, tok: PreTrainedTokenizerBase, directory: Path,
                     state_dict: dict | None = None) -> None:
    """Config, tokenizer and safetensors weights into `directory`. `state_dict`: the weights to
    write in place of the model's own (a sharded model's gathered ones)."""
    model.save_pretrained(directory, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tok.save_pretrained(directory)


def save_checkpoint(model: PreTrainedModel, tok: PreTrainedTokenizerBase, path: str | Path,
                    state_dict: dict | None = None) -> Path:
    """`write_pretrained` to `path`, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_pretrained(model, tok, tmp, state_dict)
    return path


def context_length(model: PreTrainedModel) -> int | None:
    """The number of positions the model was built for (None when its config does not say)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_generation_fits(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str],
                          max_new_tokens: int, key: str) -> None:
    """`UserError` naming `key` when the longest prompt plus `max_new_tokens` would run past the
    model's context (learned position embeddings fail there, rotary ones leave their training range)."""
    ctx = context_length(model)
    if ctx is None or not prompts:
        return
    from posttrain.train.sequences import encode_prompts

    longest = max(len(ids) for ids in encode_prompts(tok, list(dict.fromkeys(prompts))))
    if longest + max_new_tokens > ctx:
        raise UserError(f"{key}={max_new_tokens}: the longest prompt has {longest} tokens, so generation would run "
                        f"past the model's context of {ctx} positions; use at most {max(ctx - longest, 0)}")
