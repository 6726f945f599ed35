"""SIGKILL at random points, then rerun: training, diff, repair and a study, at the default thread count.

Each trial starts a command, kills it with SIGKILL after a seeded random delay (drawn over the
span an uninterrupted run of it takes), reruns it (with --resume where the command has one) to
completion, and checks that the outputs are bitwise those of the uninterrupted run and that no
temporary file or directory is left anywhere. Commands run in processes forked from one that has
imported torch and transformers already (tests/fork_cli.py), so the delays fall into the work, not
into the imports; the SIGKILL is as abrupt as for any process.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# timings, whether a run was resumed, and repair.json's "inputs": fingerprints of the input
# checkpoints by file size and mtime (posttrain.repair.writer.fingerprint), new for every run; the
# git commit in versions.json moves when the checkout does during a long run
# whether a stage's output was reused is provenance too: a repair finished before the kill is
# "cached" in the rerun's results.json, recomputed in the uninterrupted run
VOLATILE = {"wall_seconds", "step_seconds", "resumed_from_step", "finished", "inputs", "git_sha", "cached"}

TRAIN_CONFIG = """\
methods:
  sft: {method: sft, task: coin, steps: 8, prompts_per_step: 4, samples_per_prompt: 4, max_new_tokens: 8,
        lr: 1.0e-3, checkpoint_every: 1, expert_format: default, trackers: [none]}
  grpo: {objective: grpo, task: coin, steps: 6, prompts_per_step: 4, samples_per_prompt: 4, max_new_tokens: 8,
         lr: 1.0e-3, checkpoint_every: 1, trackers: [none]}
"""

STUDY_CONFIG = """\
name: kill
seed: 0
model: {hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2, max_length: 64}
world: {points24: {n_cards: 3, target: 12}, facts: {n_entities: 4, relations: [color]}}
pretrain: {steps: 12, batch_size: 16, lr: 3.0e-3, warmup_steps: 2, checkpoint_every: 4, log_every: 4}
retention: [{task: facts}]
methods:
  sft: {objective: sft, steps: 3, checkpoint_every: 1, prompts_per_step: 4, samples_per_prompt: 2, max_new_tokens: 8,
        trackers: [none]}
  grpo: {objective: grpo, steps: 3, checkpoint_every: 1, prompts_per_step: 4, samples_per_prompt: 2, max_new_tokens: 8,
         trackers: [none]}
diagnostics: {spectral: false}
repair:
  grid: [{method: reset_layers, first_frac: 0.5}]
eval: {n_per_split: 4, n_sampled_problems: 2, n_samples: 2, pass_k: [1, 2], max_new_tokens: 12}
"""


class Forker:
    """A tests/fork_cli.py --serve process: start a command, get its pid, wait for its exit code."""

    def __init__(self, tmp: Path) -> None:
        env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POSTTRAIN_DEBUG"):
            env.pop(k, None)  # the default thread count, as a user gets it
        self.p = subprocess.Popen([sys.executable, str(TESTS / "fork_cli.py"), "--serve"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=TESTS)
        self.tmp, self.n = tmp, 0

    def start(self, argv: list, cwd: Path) -> int:
        self.n += 1
        self.err = self.tmp / f"{self.n}.err"
        job = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": {}, "out": str(self.tmp / f"{self.n}.out"),
               "err": str(self.err)}
        self.p.stdin.write(json.dumps(job) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line.startswith("pid "), line
        return int(line.split()[1])

    def wait(self) -> int:
        line = self.p.stdout.readline()
        assert line.startswith("exit "), line
        return int(line.split()[1])

    def run(self, argv: list, cwd: Path) -> float:
        t0 = time.time()
        self.start(argv, cwd)
        code = self.wait()
        assert code == 0, f"{argv} exited {code}: {self.err.read_text()[-2000:]}"
        return time.time() - t0

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def killed_run(forker: Forker, argv: list, cwd: Path, delay: float) -> tuple[bool, float]:
    """Start `argv`, SIGKILL it after `delay` seconds; (whether it was killed, seconds it ran)."""
    t0 = time.time()
    pid = forker.start(argv, cwd)
    timer = threading.Timer(delay, lambda: os.kill(pid, signal.SIGKILL))
    timer.start()
    code = forker.wait()
    timer.cancel()
    return code == -signal.SIGKILL, time.time() - t0


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _canonical(obj):
    """Tensors as (dtype, shape, raw bytes), recursively: equal only when bitwise equal."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype), tuple(obj.shape), obj.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        return ("dict", [(k, _canonical(v)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_canonical(v) for v in obj])
    return (type(obj).__name__, repr(obj))


def snapshot(root: Path, skip=("logs",)) -> dict[str, object]:
    """Relative path -> content of every file under `root`: bytes, or for JSON / JSON lines the
    parsed data without timings and with `root` spelled "<root>" (each trial runs in its own
    directory); the report without its wall-time line."""
    out = {}
    here = str(root.resolve())
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(part in skip for part in p.relative_to(root).parts):
            continue
        if p.suffix == ".json":
            out[rel] = _strip(json.loads(p.read_text().replace(here, "<root>")))
        elif p.suffix == ".jsonl":
            out[rel] = [_strip(json.loads(line)) for line in p.read_text().replace(here, "<root>").splitlines()]
        elif p.suffix == ".pt":
            # optimizer/scheduler state: pickle frames the same values differently once they have
            # been through a load (its memo follows object identity), so compare what it holds
            out[rel] = _canonical(torch.load(p, map_location="cpu", weights_only=True))
        elif p.name == "report.html":
            out[rel] = re.sub(r"wall time \d+s", "", p.read_text())
        else:
            out[rel] = p.read_bytes()
    return out


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name]


def _differing(a, b, path: str = "") -> list[str]:
    """The leaf paths where two parsed JSON values differ (a few, for the failure message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in sorted(set(a) | set(b)) for p in _differing(a.get(k), b.get(k), f"{path}.{k}")][:8]
    return [] if a == b else [path or "."]


def trials(forker: Forker, rng: random.Random, n: int, argv, rerun_argv, ref: dict, span: float, work: Path,
           out_of, done) -> tuple[int, int]:
    """`n` SIGKILL trials of `argv` (run in a fresh directory under `work` each), each followed by
    `rerun_argv` to completion; returns (processes killed, killed runs that left temporaries)."""
    kills = tries = left = 0
    while kills < n:
        tries += 1
        assert tries <= 5 * n, "the command kept finishing before the kill"
        cwd = work / f"trial-{tries}"
        cwd.mkdir(parents=True)
        killed, ran = killed_run(forker, argv, cwd, rng.uniform(0.05, 0.95) * span)
        if not killed:  # it ran faster than the reference run (machine load varies): aim by this run
            span = ran
            continue
        if done(cwd):  # killed after its last write: nothing to redo, and not a kill of the work
            continue
        kills += 1
        left += bool(leftovers(cwd))  # temporaries of the killed run, for the rerun to clear
        forker.run(rerun_argv, cwd)
        got = snapshot(out_of(cwd))
        assert got.keys() == ref.keys(), sorted(got.keys() ^ ref.keys())
        bad = [k for k in ref if got[k] != ref[k]]
        where = {k: _differing(ref[k], got[k]) for k in bad[:5]}
        assert not bad, f"trial {tries}: outputs differ from the uninterrupted run: {bad[:5]} (keys: {where})"
        assert not leftovers(cwd), leftovers(cwd)
    return kills, left


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_is_bitwise_identical(coin_checkpoint, tmp_path, summary_line):
    rng = random.Random(14)
    forker = Forker(tmp_path)
    counts: dict[str, tuple[int, int]] = {}
    seconds: dict[str, float] = {}
    t_start = t = time.time()

    def lap(kind: str) -> None:
        nonlocal t
        seconds[kind], t = time.time() - t, time.time()

    try:
        cfg = tmp_path / "train.yaml"
        cfg.write_text(TRAIN_CONFIG)
        base = str(coin_checkpoint)

        # ---- training: SFT and GRPO (sampling, rewards and the shared-prefix update at the default threads)
        for method, n in (("sft", 4), ("grpo", 4)):
            train = ["train", cfg, "--method", method, "--base", base, "--out", "out"]
            (tmp_path / f"{method}-ref").mkdir()
            span = forker.run(train, tmp_path / f"{method}-ref")
            ref_train = snapshot(tmp_path / f"{method}-ref" / "out")
            counts[f"train {method}"] = trials(forker, rng, n, train, [*train, "--resume"], ref_train, span,
                                               tmp_path / f"train-{method}", lambda d: d / "out",
                                               lambda d: (d / "out" / "train.json").exists())
            lap(f"train {method}")
        ft = tmp_path / "sft-ref" / "out" / "model"

        # ---- diff (spectral, two models, so there is a pair and angle tables to write)
        diff = ["diff", base, ft, ft, "--out", "d", "--spectral"]
        (tmp_path / "diff-ref").mkdir()
        span = forker.run(diff, tmp_path / "diff-ref")
        counts["diff"] = trials(forker, rng, 5, diff, diff, snapshot(tmp_path / "diff-ref" / "d"), span,
                                tmp_path / "diff", lambda d: d / "d", lambda d: (d / "d" / "diff.json").exists())
        lap("diff")

        # ---- repair (killed runs leave .r.<pid>.*.tmp beside r; the rerun must clear them)
        repair = ["repair", "uv-merge", "--base", base, "--target", ft, "--top", "0.5", "--out", "r"]
        (tmp_path / "repair-ref").mkdir()
        span = forker.run(repair, tmp_path / "repair-ref")
        counts["repair"] = trials(forker, rng, 6, repair, repair, snapshot(tmp_path / "repair-ref"), span,
                                  tmp_path / "repair", lambda d: d, lambda d: (d / "r").exists())
        lap("repair")

        # ---- a whole study (pretrain, SFT, eval, diagnostics, repair sweep, report)
        scfg = tmp_path / "study.yaml"
        scfg.write_text(STUDY_CONFIG)
        study = ["study", scfg, "--out", "s"]
        (tmp_path / "study-ref").mkdir()
        span = forker.run(study, tmp_path / "study-ref")
        counts["study"] = trials(forker, rng, 3, study, [*study, "--resume"], snapshot(tmp_path / "study-ref" / "s"),
                                 span, tmp_path / "study", lambda d: d / "s", lambda d: (d / "s" / "report.html").exists())
        lap("study")
    finally:
        forker.close()
    total = sum(k for k, _ in counts.values())
    line = (f"kill-and-resume: {total} SIGKILL trials ("
            + ", ".join(f"{kind} {k} in {seconds[kind]:.0f}s" for kind, (k, _) in counts.items())
            + f"; {time.time() - t_start:.0f}s in all), each rerun bitwise identical to an uninterrupted run; "
            f"{sum(x for _, x in counts.values())} killed runs left temporaries, all cleared by the rerun")
    summary_line(line)
    print(line)
    assert total >= 20
