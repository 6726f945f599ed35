"""Data-parallel training (posttrain.train.distributed): 2 processes on CPU over gloo give the run of
1 process with the same global batch, write one set of outputs, and resume."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.train.relaunch import requested_cpu_processes, torchrun_argv
from posttrain.train.rollout import _sample

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """\
methods:
  m: {objective: grpo, task: coin, steps: 4, prompts_per_step: 4, samples_per_prompt: 4, max_new_tokens: 8,
      lr: 3.0e-3, checkpoint_every: 2, trackers: [none]}
"""
# the samples are the same draws, so these are equal; the losses differ only by float summation order
EXACT = ("rollout/reward", "rollout/samples", "rollout/malformed", "rollout/len", "rollout/format/default", "adv_abs_mean",
         "groups_zero_adv", "lr", "ratio_mean", "clipfrac")
CLOSE = ("loss", "pg_loss", "grad_norm", "kl_ref")
RTOL, ATOL = 1e-5, 1e-6


def test_sample_over_ranks_is_multinomial():
    """Each process's rows, drawn from the noise of all rows still sampling, are torch.multinomial's."""
    probs = torch.softmax(torch.randn(6, 37, generator=torch.Generator().manual_seed(1)) * 3, -1)
    alive = torch.tensor([True, False, True, True, False, True])
    whole = torch.multinomial(probs[alive], 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
    rows = alive.nonzero().squeeze(-1)
    for mine in (rows[:2], rows[2:], rows[1:3]):
        part = _sample(probs[mine], torch.Generator().manual_seed(7), (alive, mine))
        assert torch.equal(part, whole[[int(r) for r in (alive.cumsum(0) - 1)[mine]]])
    # drawing noise for its own rows only (as a naive shard would) gives other samples
    alone = torch.multinomial(probs[rows[2:]], 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
    assert not torch.equal(alone, whole[2:])


CPU_ENV = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}


@pytest.mark.parametrize("parent, env, n", [
    (["python", "/v/bin/accelerate", "launch", "--num_processes", "2", "--cpu", "-m", "posttrain.cli", "train"], {}, 2),
    (["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=3", "run_cli.py", "train"], {}, 3),
    (["/v/bin/python3", "/v/bin/accelerate", "launch", "--cpu", "--num_processes", "1", "x.py"], {}, 0),
    # accelerate started them itself (mpirun), or a launcher already set the world size
    (["accelerate", "launch", "--cpu", "--num_processes", "2", "--mpirun_hostfile", "h", "x.py"], {}, 0),
    (["accelerate", "launch", "--cpu", "--num_processes", "2", "x.py"], {"WORLD_SIZE": "2"}, 0),
    # not on CPU (a GPU launch starts its own processes), or not accelerate at all
    (["accelerate", "launch", "--num_processes", "2", "x.py"], {"ACCELERATE_USE_CPU": "False"}, 0),
    (["python", "train.py", "launch", "--num_processes", "2"], {}, 0),
    (["bash", "-c", "posttrain train"], {}, 0),
])
def test_requested_cpu_processes_reads_the_accelerate_command_line(parent, env, n):
    assert requested_cpu_processes(parent, {**CPU_ENV, **env}) == n


def test_torchrun_argv_keeps_the_module_or_script_and_accelerates_port():
    head = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", "29511"]
    assert torchrun_argv(2, ["python", "-m", "posttrain.cli", "train", "c.yaml"], CPU_ENV) == [
        *head, "--module", "posttrain.cli", "train", "c.yaml"]
    assert torchrun_argv(2, ["python", "-u", "tests/run_cli.py", "train", "--resume"], CPU_ENV) == [
        *head, "tests/run_cli.py", "train", "--resume"]


def test_other_commands_refuse_several_processes(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "WORLD_SIZE": "2", "RANK": "1"}
    p = subprocess.run([sys.executable, "-m", "posttrain.cli", "diff", "--base", "a", "--target", "b", "--out",
                        str(tmp_path / "d")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: `posttrain diff` runs in one process; of the commands only `posttrain train` runs under "
        "accelerate launch / torchrun"]
    assert not (tmp_path / "d").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tmp: Path, base: Path, out: str, procs: int, *extra: str, launch: str = "config",
           config: str = "ddp_cpu.yaml", cli: list[str] | None = None) -> subprocess.CompletedProcess:
    """`cli`: the command after the interpreter (default: `posttrain train` of method m of tmp/cfg.yaml)."""
    cli = cli or [str(ROOT / "tests" / "run_cli.py"), "train", str(tmp / "cfg.yaml"), "--method", "m", "--base",
                  str(base), "--out", str(tmp / out), "--device", "cpu", *extra]
    if procs == 1:
        cmd = [sys.executable, *cli]
    elif launch == "config":  # a shipped config, on a free port
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / config), "--num_processes", str(procs),
               "--main_process_port", str(_free_port()), *cli]
    else:  # the plain command line, whose one process posttrain turns into `procs`
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--cpu",
               "--main_process_port", str(_free_port()), *cli]
    env = {"POSTTRAIN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_matches_one_process(one: Path, two: Path) -> tuple[list[dict], list[dict]]:
    """The metrics of a run of 2 processes against the 1-process run: written once, checkpoints
    finished, equal samples, losses within float tolerance, and a real training signal."""
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]  # one writer: no duplicate lines
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not list(two.glob("**/*.tmp"))
    for x, y in zip(a[1:], b[1:]):
        assert set(x) == set(y)
        for k in EXACT:
            assert x[k] == y[k], (x["step"], k)
        for k in CLOSE:
            assert y[k] == pytest.approx(x[k], rel=RTOL, abs=ATOL), (x["step"], k)
    assert len({r["rollout/reward"] for r in a[1:]}) > 1 and any(r["loss"] != 0 for r in a[1:])  # a real signal
    return a, b


def stopped_at_step_2(tmp_path: Path, base: Path) -> Path:
    """A copy of the 2-process run `two` as a kill after its step-2 checkpoint leaves it; one
    process may not resume it."""
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "two", stopped)
    shutil.rmtree(stopped / "model")
    shutil.rmtree(stopped / "checkpoints" / "step-4")
    (stopped / "train.json").unlink()
    alone = _train(tmp_path, base, "stopped", 1, "--resume")
    assert alone.returncode == 2 and "written by 2 process(es)" in alone.stderr, alone.stderr[-2000:]
    return stopped


@pytest.mark.slow
def test_two_processes_match_one_write_once_and_resume(coin_checkpoint, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    one = _train(tmp_path, coin_checkpoint, "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(tmp_path, coin_checkpoint, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.split() == [str(tmp_path / "two" / "model")]  # one process speaks

    a, b = assert_matches_one_process(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "train.json").read_text())["processes"] == 2
    wa, wb = load_file(tmp_path / "one/model/model.safetensors"), load_file(tmp_path / "two/model/model.safetensors")
    base = load_file(coin_checkpoint / "model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k
    assert any(not torch.equal(wa[k], base[k]) for k in wa)

    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731

    # stopped after the checkpoint at step 2: resumed by 2 processes, it ends where the whole run did
    stopped = stopped_at_step_2(tmp_path, coin_checkpoint)
    # resumed by `accelerate launch --num_processes 2 --cpu` (no config): accelerate starts one
    # process, which restarts as two (or the resume would refuse a run of 2 processes) and says so
    again = _train(tmp_path, coin_checkpoint, "stopped", 2, "--resume", launch="plain")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting 2 with torch.distributed.run" in again.stderr
    assert again.stdout.split() == [str(stopped / "model")]
    assert strip(_rows(stopped)) == strip(b)
    wc = load_file(stopped / "model/model.safetensors")
    assert all(torch.equal(wb[k], wc[k]) for k in wb)
    assert json.loads((stopped / "train.json").read_text())["resumed_from_step"] == 2


EI_CONFIG = """\
methods:
  m: {method: ei_restart, task: coin, steps: 4, prompts_per_step: 4, samples_per_prompt: 2, max_new_tokens: 8,
      lr: 3.0e-3, rounds: 2, filter_samples: 3, top_p: 0.9, checkpoint_every: 2, trackers: [none]}
"""


@pytest.mark.slow
def test_two_processes_run_expert_iteration_as_one(coin_checkpoint, tmp_path):
    """Filtered data: the processes split each round's sampling and gather it, and every process
    trains on the whole filtered batch, so 2 processes give the 1-process run bit for bit."""
    (tmp_path / "cfg.yaml").write_text(EI_CONFIG)
    one = _train(tmp_path, coin_checkpoint, "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(tmp_path, coin_checkpoint, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731
    a, b = strip(_rows(tmp_path / "one")), strip(_rows(tmp_path / "two"))
    assert a == b
    assert sum(r.get("filtered/batch", 0) for r in a) > 0 and any(r.get("loss", 0) != 0 for r in a)  # a real signal
    for r in ("round-0.json", "round-1.json"):
        assert (tmp_path / "two" / "rounds" / r).read_text() == (tmp_path / "one" / "rounds" / r).read_text()
    wa, wb = load_file(tmp_path / "one/model/model.safetensors"), load_file(tmp_path / "two/model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "two" / "train.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_two_processes_refuse_fp16(coin_checkpoint, tmp_path):
    """fp16 needs loss scaling, which the data-parallel loop (no prepared optimizer) does not undo."""
    (tmp_path / "cfg.yaml").write_text("dtype: fp16\n" + CONFIG)
    half = _train(tmp_path, coin_checkpoint, "half", 2)
    assert half.returncode != 0 and "exitcode: 2" in " ".join(half.stderr.split())  # torchrun reports the worker's 2
    errors = {line for line in half.stderr.splitlines() if line.startswith("error:")}
    assert errors == {"error: dtype: fp16 under several processes needs loss scaling, which the data-parallel loop "
                      "does not do; use bf16"}
    assert not (tmp_path / "half").exists()
