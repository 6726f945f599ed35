"""Progress bars (rich) that stay quiet when output is not a terminal or when disabled."""

from __future__ import annotations

import contextlib
import os
import sys
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
