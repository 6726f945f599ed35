import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("POSTTRAIN_NO_PROGRESS", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny Llama + char tokenizer saved in HF format."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import save_checkpoint
    from posttrain.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_length=96),
                             len(tok), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(model, tok, path)
    return path


# a task a random tiny model can score on (tests/coin_task.py), registered for every test
import coin_task  # noqa: E402,F401


@pytest.fixture(scope="session")
def coin_checkpoint(tmp_path_factory):
    """A tiny model pretrained for a few steps on `coin` demos: it answers with one random letter and
    EOS, so on-policy samples finish and earn mixed rewards (about half correct)."""
    from posttrain.config import ModelConfig, PretrainConfig, TaskRef
    from posttrain.tasks import build_task
    from posttrain.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("coin")
    cfg = PretrainConfig(steps=40, batch_size=32, lr=1e-2, warmup_steps=2, mixture=[TaskRef(task="coin")], log_every=40)
    model_cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_length=96)
    return pretrain(model_cfg, cfg, {"coin": build_task("coin")}, root / "pretrain", root / "model", seed=0, device="cpu")


# Lines for the end of the pytest run (`make test` shows them): the corpus size, the number of
# kill-and-resume trials. Tests add them through the `summary_line` fixture.
_SUMMARY = pytest.StashKey[list]()


@pytest.fixture
def summary_line(request):
    return request.config.stash.setdefault(_SUMMARY, []).append


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("posttrain reliability")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """`posttrain demo --preset quick` run once per session (the CLI end-to-end test and the
    browser test of its report share it)."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "demo", "--preset", "quick", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """`posttrain ARGS...` in this process: (exit code, stdout, stderr)."""
    from posttrain.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["posttrain", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
            raise SystemExit(0)
        cap = capsys.readouterr()
        return e.value.code, cap.out, cap.err

    return run
