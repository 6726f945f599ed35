"""Atomic file and directory writes, version stamps.

Everything the project writes goes through these helpers so that a crash or a Ctrl-C never leaves
a half-written results file or checkpoint where a complete one used to be.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError) as e:
        return isinstance(e, PermissionError)  # someone else's live process; anything else: no such pid
    return True


def _tmp_prefix(path: Path) -> str:
    # the writer's pid is part of the name, so a later writer can tell a dead writer's leftovers
    # (SIGKILL, power loss) from a live one's work in progress
    return f".{path.name}.{os.getpid()}."


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove what killed writers of `path` left beside it: `.<name>.<pid>.<random>.tmp` temp files
    and directories of `atomic_file` / `atomic_dir`, and `.<name>.old-<pid>` directories, whose
    process <pid> is gone. Nothing else is touched: not other names, not a live process's temps.
    A stale `.old-<pid>` directory is moved back to `path` when `path` itself is missing (the
    writer died between moving the old version aside and moving the new one in)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    name = re.escape(path.name)
    tmp_re = re.compile(rf"\.{name}\.(\d+)\.[A-Za-z0-9_]{{8}}\.tmp")
    old_re = re.compile(rf"\.{name}\.old-(\d+)")
    removed = []
    for entry in path.parent.iterdir():
        m = tmp_re.fullmatch(entry.name) or old_re.fullmatch(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if m.re is old_re and not path.exists() and entry.is_dir():
            os.replace(entry, path)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces `path` in one rename, on
    any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would have
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) replaced by None and numpy / torch scalars by
    Python numbers, recursively: strict JSON has no NaN, and "undefined" is what null says."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if not isinstance(obj, (str, int, bool, type(None))) and hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return json_safe(obj.item())
    return obj


def strict_json(data: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes a bare NaN/Infinity (see `json_safe`)."""
    return json.dumps(json_safe(data), allow_nan=False, default=_json_default, **kwargs)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, strict_json(data, indent=2, sort_keys=False) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in (nearly) one step.

    The old directory, if any, is first renamed aside and removed only after the new one is in
    place, so at every instant either the old or the new complete directory exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def versions() -> dict[str, str]:
    """Versions of the interpreter, key libraries and the git commit, for reproducibility."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("posttrain", "torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        out["git_sha"] = sha.stdout.strip() if sha.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = "unknown"
    return out
