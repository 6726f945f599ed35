"""Turn a `MODEL` argument (a local directory or a Hugging Face hub id) into a local directory.

Resolution happens here, once, so that transformers is only ever handed a local directory and
never starts its own network retries (about 50 s and 20 lines of warnings for an id that does not
exist when the hub cannot be reached):

1. an existing path is used as is;
2. a string that cannot be a hub id (absolute, `./`, `../`, `~`, two or more slashes) is a
   missing local path: "not found";
3. a hub id already in the local Hugging Face cache is used from there (no network);
4. otherwise, unless `HF_HUB_OFFLINE` is set, the hub is asked once with a short timeout and no
   retries, and only an id it knows is downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from posttrain.errors import UserError

HUB_TIMEOUT_S = 5.0
# org/name or a bare legacy name ("gpt2"), the characters the hub allows
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
# what transformers reads from a checkpoint; everything else of a hub repo (other formats,
# onnx exports, images) is not downloaded
_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]


def looks_like_hub_id(s: str) -> bool:
    if s.startswith(("/", "./", "../", "~", ".")) or s.endswith("/") or "\\" in s:
        return False
    return bool(_HUB_ID.fullmatch(s)) and not s.endswith((".", "-")) and ".." not in s


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.is_offline_mode() or any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of `repo_id` (its `config.json` is cached), without network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id after all
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def resolve_checkpoint(model: str | Path, what: str = "checkpoint") -> Path:
    """A local checkpoint directory for `model` (see the module docstring); `UserError` otherwise."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    s = str(model)
    if not looks_like_hub_id(s):
        raise UserError(f"{what} not found: {s}")
    snap = cached_snapshot(s)
    if snap is not None:
        return snap
    hint = f"download it (huggingface-cli download {s}) or pass the path of a local copy"
    if "/" not in s:
        # a bare word is far more often a mistyped directory than one of the few legacy hub ids
        raise UserError(f"{what} not found: {s} (no such directory, and no hub model {s!r} in the local cache)")
    if _offline():
        raise UserError(f"{what} {s!r}: no such directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set); {hint}")
    from huggingface_hub import HfApi, snapshot_download

    try:
        HfApi().model_info(s, timeout=HUB_TIMEOUT_S)  # one request: no retries, short timeout
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end the same way
        reason = _reason(e)
        raise UserError(f"{what} {s!r}: no such directory, not in the Hugging Face cache, and the hub {reason}; {hint}") from None
    try:
        return Path(snapshot_download(s, allow_patterns=_PATTERNS, etag_timeout=HUB_TIMEOUT_S))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what} {s!r}: download from the hub failed ({_reason(e)}); {hint}") from None


def _reason(e: Exception) -> str:
    name = type(e).__name__
    if "RepositoryNotFound" in name or "GatedRepo" in name:
        return "has no such model (or it is private/gated)"
    text = str(e).strip().splitlines()
    return f"could not be reached ({name}: {text[0][:120]})" if text else f"could not be reached ({name})"
