"""Run many `posttrain` command lines, each in its own forked process, after importing once.

A fresh interpreter per command pays the torch and transformers imports (seconds) every time;
the bad-input corpus runs ~80 commands. This server imports them once, then forks one child per
command line: the child is a separate process with its own exit code, its own cwd and
environment, and stdout/stderr redirected at the file-descriptor level, so everything the
command (and any library) prints is captured exactly as a terminal would show it.

The parent never runs a torch operation, so no OpenMP thread pool exists at fork time (forking
after one has started can deadlock the child).

Batch mode: stdin is a JSON list of {"argv", "cwd", "env", "out", "err"}; stdout a JSON list of
exit codes. With --serve: one job per stdin line; for each, "pid <pid>" is printed when the child
starts and "exit <code>" when it ends (negative: killed by that signal), so a test can SIGKILL the
child mid-work (tests/test_kill_resume.py).
"""

import json
import os
import signal
import sys
import time

import coin_task  # noqa: F401 - the test-only task, as in run_cli.py

import posttrain.cli  # noqa: E402
import posttrain.models.loading  # noqa: E402,F401 - the expensive imports, done once
import posttrain.repair  # noqa: E402,F401
import posttrain.report.html  # noqa: E402,F401
import posttrain.study  # noqa: E402,F401


def child(job: dict) -> None:
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    for fd, path in ((1, job["out"]), (2, job["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["posttrain", *job["argv"]]
    code = 0
    try:
        posttrain.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception of a real process
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(job)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        return serve()
    jobs = json.load(sys.stdin)
    workers = int(os.environ.get("FORK_CLI_WORKERS", "3"))
    timeout = float(os.environ.get("FORK_CLI_TIMEOUT", "300"))  # a bad input must not start real work
    codes: list[int | None] = [None] * len(jobs)
    running: dict[int, tuple[int, float]] = {}
    todo = list(range(len(jobs)))
    while todo or running:
        while todo and len(running) < workers:
            i = todo.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(jobs[i])
            running[pid] = (i, time.time() + timeout)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[running.pop(pid)[0]] = os.waitstatus_to_exitcode(status)
            continue
        for pid, (i, deadline) in running.items():
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)  # reported as -9
        time.sleep(0.02)
    json.dump(codes, sys.stdout)


if __name__ == "__main__":
    main()
