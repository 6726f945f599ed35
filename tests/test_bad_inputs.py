"""Every CLI command against the generated bad-input corpus (tests/bad_inputs.py).

Each case must exit with code 2 and exactly one line on stderr, starting with `error: ` and
naming the file or key at fault (the case's regex), with no traceback, and must leave every file
that existed before exactly as it was (no file changed, none created or removed).
"""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bad_inputs import HUGE, build_corpus, huge_integer_cases, tiny_checkpoint

TESTS = Path(__file__).resolve().parent


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (hidden ones included) and "dir" for every directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def run_cases(cases, tmp: Path) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of every case: `fresh` ones in a new interpreter each, the others
    in processes forked from one that has imported everything (tests/fork_cli.py)."""
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
    env.pop("POSTTRAIN_DEBUG", None)
    jobs = [{"argv": c.argv, "cwd": str(c.cwd), "env": c.env, "out": str(tmp / f"{i}.out"), "err": str(tmp / f"{i}.err")}
            for i, c in enumerate(cases)]
    forked = [i for i, c in enumerate(cases) if not c.fresh]
    per_job = float(env.setdefault("FORK_CLI_TIMEOUT", "300"))
    r = subprocess.run([sys.executable, str(TESTS / "fork_cli.py")], input=json.dumps([jobs[i] for i in forked]),
                       capture_output=True, text=True, env=env, cwd=TESTS, timeout=600 + per_job * len(forked))
    assert r.returncode == 0, r.stderr[-3000:]
    codes = dict(zip(forked, json.loads(r.stdout)))

    def fresh(i: int) -> None:
        c = cases[i]
        try:
            p = subprocess.run([sys.executable, str(TESTS / "run_cli.py"), *c.argv], cwd=c.cwd, env={**env, **c.env},
                               capture_output=True, text=True, timeout=per_job)
            out, err, codes[i] = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, err, codes[i] = e.stdout or "", e.stderr or "", -9
        Path(jobs[i]["out"]).write_text(out if isinstance(out, str) else out.decode())
        Path(jobs[i]["err"]).write_text(err if isinstance(err, str) else err.decode())

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(fresh, [i for i, c in enumerate(cases) if c.fresh]))
    return [(codes[i], Path(j["out"]).read_text(), Path(j["err"]).read_text()) for i, j in enumerate(jobs)]


def check_case(case, code: int, stdout: str, stderr: str, before: dict, after: dict) -> str | None:
    """None when the case behaves, else what went wrong."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = []
    if code != 2:
        problems.append("killed after running past the time limit" if code == -9 else f"exit code {code}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"{len(lines)} stderr lines")
    elif not re.search(case.expect, lines[0]):
        problems.append(f"message does not match {case.expect!r}")
    if "Traceback" in stderr or "Traceback" in stdout:
        problems.append("traceback")
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        problems.append(f"files changed/created/removed: {changed[:5]}")
    return f"{case.id}: {'; '.join(problems)}\n    stderr: {stderr.strip()[-600:]}" if problems else None


@pytest.mark.slow
def test_bad_input_corpus(tmp_path_factory, summary_line):
    root = tmp_path_factory.mktemp("corpus")
    good = tiny_checkpoint(root / "good")
    cases = build_corpus(root, good)
    assert len({c.id for c in cases}) == len(cases)
    shared = {d: tree_hash(root / d) for d in ("good", "ck", "configs")}
    before = [tree_hash(c.cwd) for c in cases]
    results = run_cases(cases, tmp_path_factory.mktemp("corpus-logs"))
    failures = [f for c, b, (code, out, err) in zip(cases, before, results)
                if (f := check_case(c, code, out, err, b, tree_hash(c.cwd)))]
    for d, h in shared.items():
        if tree_hash(root / d) != h:
            failures.append(f"the corpus's shared inputs under {d}/ changed")
    if list(root.rglob("PWNED*")):
        failures.append("a malicious pickle ran its code")
    if (root / "cases" / "escaped").exists():
        failures.append("a study name escaped runs/ (wrote cases/escaped)")
    n = len(cases) + len(huge_integer_cases())
    summary_line(f"bad-input corpus: {n} cases ({len(cases)} CLI runs, {len(huge_integer_cases())} verifier answers)")
    print(f"bad-input corpus: {n} cases")
    assert not failures, f"{len(failures)} problems in {len(cases)} cases:\n" + "\n".join(failures)
    assert n >= 40


@pytest.mark.parametrize("case_id,task,completion", huge_integer_cases(), ids=[c[0] for c in huge_integer_cases()])
def test_huge_integer_answers_are_malformed(case_id, task, completion):
    from posttrain.tasks import build_task
    from posttrain.tasks.base import MALFORMED

    t = build_task(task)
    problem = t.sample(random.Random(0), "id")
    assert len(completion) >= len(HUGE)
    assert t.verify(problem, completion) == MALFORMED
