"""Progress reporting: rich bars that stay quiet when output is not a terminal or when disabled, and
line loggers for long stages (a line per tenth, readable in CI logs)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def enabled_by_default() -> bool:
    return sys.stderr.isatty() and not os.environ.get("POSTTRAIN_NO_PROGRESS")


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; shows a bar with ETA on an interactive terminal."""
    if not (enabled and enabled_by_default()):
        yield lambda n=1: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


def progress_logger(say: Callable[[str], None], what: str, total: int) -> Callable[[int, dict], None]:
    """Log a line about every tenth of a stage (progress that also reads well in CI logs)."""
    t0 = time.time()
    last = [0]

    def cb(step: int, row: dict) -> None:
        tenth = step * 10 // max(total, 1)
        if step == 0 or (tenth <= last[0] and step != total):
            return
        last[0] = tenth
        parts = [f"{k}={row[k]:.3g}" for k in ("loss", "rollout/reward", "kl_ref") if isinstance(row.get(k), float)]
        acc = [f"{k.split('/')[1]}/{k.split('/')[2]}={v:.2f}" for k, v in row.items() if k.startswith("eval/")]
        eta = (time.time() - t0) / step * (total - step)
        say(f"  {what} {step}/{total} " + " ".join(parts + acc) + f"  eta {eta:.0f}s")

    return cb
