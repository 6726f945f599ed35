"""`accelerate launch --cpu --num_processes N`: start the N processes that accelerate does not.

accelerate (1.x) starts CPU processes through mpirun only (`--mpirun_hostfile`); without it, its
simple launcher starts ONE process and passes it no world size, so `posttrain train` would silently
train alone. The child cannot see N in its environment, only in its parent's command line. When
that parent is `accelerate launch` with `--cpu` (or `use_cpu` from its config) and asks for N > 1
processes, posttrain restarts itself under `torch.distributed.run` with N processes on this machine,
the launcher accelerate's own multi-GPU path uses, and says so in one line. Every other launch is
left alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path

from posttrain.errors import UserError


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or the parent is gone
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _launch_args(parent: list[str]) -> list[str] | None:
    """The arguments after `accelerate launch` (console script or `-m accelerate.commands.launch`)."""
    for i, a in enumerate(parent):
        if a == "accelerate.commands.launch" or (a == "launch" and i and Path(parent[i - 1]).name.startswith("accelerate")):
            return parent[i + 1:]
    return None


def requested_cpu_processes(parent: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """The number of CPU processes `accelerate launch` was asked for and did not start (0 if none).

    Read with accelerate's own parser and defaults (its config file included), so
    `--num_processes 2`, `--num_processes=2` and a config's `num_processes` all count."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") or env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1"):
        return 0
    args = _launch_args(_parent_argv() if parent is None else parent)
    if args is None:
        return 0
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = launch_command_parser().parse_args(args)
        logging.disable(logging.WARNING)  # accelerate warns about every default it fills in
        try:
            parsed, _, _ = _validate_launch_command(parsed)
        finally:
            logging.disable(logging.NOTSET)
    except (SystemExit, ValueError, OSError):
        return 0
    if parsed.mpirun_hostfile or (parsed.num_machines or 1) > 1:  # accelerate did start them itself
        return 0
    n = int(parsed.num_processes or 1)
    return n if n > 1 else 0


def torchrun_argv(n: int, orig_argv: list[str], env: dict[str, str]) -> list[str]:
    """This process's command (`python -m posttrain.cli ...` or `python script ...`) under
    `torch.distributed.run` with `n` processes, on the address and port accelerate chose."""
    rest = orig_argv[1:]
    while rest and rest[0].startswith("-") and rest[0] != "-m":  # interpreter flags (-u, -X ...)
        rest = rest[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", env.get("MASTER_PORT", "29500")]
    if rest[:1] == ["-m"]:
        return [*cmd, "--module", *rest[1:]]
    return [*cmd, *rest]


def relaunch_if_accelerate_cpu(command: str | None) -> None:
    """Replace this process by `n` processes when `accelerate launch --cpu` asked for them."""
    n = requested_cpu_processes()
    if not n:
        return
    if command != "train":
        raise UserError(f"`posttrain {command}` runs in one process; of the commands only `posttrain train` "
                        "runs under accelerate launch / torchrun")
    argv = torchrun_argv(n, sys.orig_argv, dict(os.environ))
    print(f"posttrain: accelerate launch --cpu starts one process without mpirun; starting {n} with "
          "torch.distributed.run", file=sys.stderr, flush=True)
    os.execv(sys.executable, argv)
