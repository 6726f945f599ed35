"""On-policy training gives the same bits run after run at more than one thread.

The shared-prefix layout gathers per-token outputs from a [R*L, ...] tensor in which a prompt's
positions are read by every row of its group; autograd's backward of that gather accumulates with
atomics on CPU at >1 thread (run-to-run different sums). These tests run at 2 threads explicitly
and with batches above the 32768-element size where PyTorch starts to parallelise that backward.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.train.policy import gather_rows, policy_forward
from posttrain.train.sequences import pack
from procs import sigkill_when

ROOT = Path(__file__).resolve().parents[1]
# the subprocesses' thread count, whatever the machine has
THREADS = {k: "2" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


class threads:
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _gather_grad(x: torch.Tensor, index: torch.Tensor, upstream: torch.Tensor, fn) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (fn(x, index) * upstream).sum().backward()
    return x.grad


def test_gather_rows_backward_is_the_one_thread_sum_at_two_threads():
    """Rows read many times (a shared prompt) get their gradients summed in index order: the bits of
    autograd's own one-thread backward of x[index], on every repetition at 2 threads."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 100, generator=g)
    index = torch.randint(0, 320, (32, 60), generator=g)
    index[:, :5] = torch.arange(5)  # 32 rows share their first five positions
    upstream = torch.randn(32, 60, 100, generator=g)  # 192000 elements: the parallel size
    with threads(1):
        expected = _gather_grad(x, index, upstream, lambda a, i: a[i])
    with threads(2):
        assert torch.equal(gather_rows(x, index), x[index])
        for _ in range(20):
            assert torch.equal(_gather_grad(x, index, upstream, gather_rows), expected)


@pytest.mark.parametrize("critic", [False, True])
def test_shared_prefix_gradient_is_the_same_every_time_at_two_threads(tiny_checkpoint, critic):
    """policy_forward on a GRPO-shaped batch (7 groups of 8 sharing their prompt): the parameter
    gradients are bitwise equal over repeated backward passes at 2 threads, and equal to 1 thread.
    An odd group count puts the two threads' halves of the old accumulate inside one group. With
    the critic (PPO) the gather is of hidden states, and entropy and values join the loss."""
    from posttrain.models.loading import load_model
    from posttrain.train.policy import ValueHead

    model, _ = load_model(tiny_checkpoint, device="cpu")
    g = torch.Generator().manual_seed(1)
    head = None
    if critic:
        head = ValueHead(model.config.hidden_size)
        with torch.no_grad():
            head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g))
    prompts, completions = [], []
    for _ in range(7):
        p = torch.randint(3, 60, (10,), generator=g).tolist()
        for _ in range(8):
            prompts.append(p)
            completions.append(torch.randint(3, 60, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist())
    batch = pack(prompts, completions, pad_id=0, group_size=8)
    assert batch.shared is not None
    weight = torch.randn((3, *batch.target_mask.shape), generator=g)
    params = list(model.parameters()) + (list(head.parameters()) if critic else [])

    def grads():
        for p in params:
            p.grad = None
        out = policy_forward(model, batch, entropy=critic, value_head=head)
        loss = out.logp * weight[0]
        if critic:
            loss = loss + out.entropy * weight[1] + out.values * weight[2]
        (loss * batch.target_mask).sum().backward()
        return [p.grad.clone() for p in params]

    with threads(1):
        expected = grads()
    with threads(2):
        for _ in range(5):
            assert all(torch.equal(a, b) for a, b in zip(grads(), expected))


def _config(tmp_path: Path, method: str, **extra) -> Path:
    # one group of 32 rows: the gathered logits of a step are above 32768 elements, and the two
    # threads' halves of the old accumulate both add into that one prompt's positions all along
    fields = dict(method=method, task="coin", steps=24, prompts_per_step=1, samples_per_prompt=32, max_new_tokens=8,
                  lr=1.0e-3, trackers=["none"], **extra)
    path = tmp_path / f"{method}.yaml"
    path.write_text(json.dumps({"methods": {"m": fields}}))  # JSON is YAML
    return path


def _train(config: Path, base: Path, out: Path, *extra: str, popen: bool = False):
    cmd = [sys.executable, str(ROOT / "tests" / "run_cli.py"), "train", str(config), "--method", "m", "--base", str(base),
           "--out", str(out), *extra]
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", **THREADS}
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]


def _differing(a: dict, b: dict) -> list[str]:
    """Names of the tensors that are not bitwise equal (or not in both)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


@pytest.mark.slow
def test_two_grpo_runs_at_two_threads_are_bitwise_identical(coin_checkpoint, tmp_path):
    config = _config(tmp_path, "grpo")
    _train(config, coin_checkpoint, tmp_path / "a")
    _train(config, coin_checkpoint, tmp_path / "b")
    rewards = [r["rollout/reward"] for r in _metrics(tmp_path / "a")[1:]]
    assert 0 < sum(rewards) / len(rewards) < 1  # mixed rewards: the policy gradient is not zero
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert _differing(a, load_file(str(coin_checkpoint / "model.safetensors")))  # training moved the weights
    assert _differing(a, b) == []
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


@pytest.mark.slow
def test_grpo_sigkill_then_resume_at_two_threads_is_bitwise_identical(coin_checkpoint, tmp_path):
    config = _config(tmp_path, "grpo", checkpoint_every=4)
    full, killed = tmp_path / "full", tmp_path / "killed"
    _train(config, coin_checkpoint, full)
    proc = _train(config, coin_checkpoint, killed, popen=True)
    sigkill_when(proc, killed / "checkpoints" / "step-12" / "trainer_state.pt", timeout=600)
    assert not (killed / "model").exists()
    _train(config, coin_checkpoint, killed, "--resume")
    assert json.loads((killed / "train.json").read_text())["resumed_from_step"] >= 12
    assert _differing(_weights(full), _weights(killed)) == []
    assert _metrics(full) == _metrics(killed)
