"""FSDP (posttrain.train.fsdp): 2 processes on CPU over gloo, the policy sharded with FSDP2, give the
run of 1 process with the same global batch, write one set of full-weight outputs, resume bit for
bit, and refuse what the sharded loop does not implement."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import TrainConfig
from posttrain.errors import UserError
from posttrain.train import fsdp
from test_distributed import ATOL, CONFIG, RTOL, ROOT, _rows, _train, assert_matches_one_process, stopped_at_step_2

# beyond GRPO: SFT on expert data, PPO with its separate (replicated) critic, Expert Iteration
# restarting from the init each round (filtered data: the policy's weights reloaded into the shards)
MORE = """\
methods:
  sft: {objective: sft, data: expert, task: coin, steps: 4, prompts_per_step: 4, samples_per_prompt: 2,
        lr: 3.0e-3, trackers: [none]}
  ppo: {method: ppo, task: coin, steps: 3, prompts_per_step: 4, samples_per_prompt: 2, max_new_tokens: 8,
        lr: 3.0e-3, trackers: [none]}
  ei: {method: ei_restart, task: coin, steps: 4, prompts_per_step: 4, samples_per_prompt: 2, max_new_tokens: 8,
       lr: 3.0e-3, rounds: 2, filter_samples: 3, top_p: 0.9, trackers: [none]}
"""
NOT_GLOBAL = ("step_seconds",)  # wall time


def _check_supported(**kw):
    args = dict(critic_mode=None, half="no", dtype="fp32", device_type="cpu", accelerate_precision="no")
    cfg = TrainConfig(**{"objective": "grpo", "data": "on_policy", **kw.pop("cfg", {})})
    fsdp.check_supported(cfg, "m", **{**args, **kw})


@pytest.mark.parametrize("kw, message", [
    ({"cfg": {"lora": {"r": 2}}}, "methods.m.lora: LoRA is not supported under FSDP"),
    ({"cfg": {"objective": "ppo"}, "critic_mode": "shared"}, "methods.m.critic: shared (a value head"),
    ({"cfg": {"rollout": {"backend": "vllm"}}}, "methods.m.rollout.backend: vllm is not supported under FSDP"),
    ({"half": "bf16", "dtype": "bf16"}, "dtype: bf16: half precision under FSDP runs on GPUs only"),
    ({"accelerate_precision": "bf16"}, "accelerate mixed_precision: bf16: half precision under FSDP runs on GPUs only"),
    ({"accelerate_precision": "bf16", "device_type": "cuda"}, "accelerate mixed_precision: bf16: under FSDP the "
                                                              "precision is the study's dtype (now fp32)"),
    ({"half": "fp16", "dtype": "fp16", "device_type": "cuda", "accelerate_precision": "fp16"},
     "dtype: fp16 under FSDP needs loss scaling"),
    ({"device_type": "cuda", "accelerate_precision": "fp16"}, "accelerate mixed_precision: fp16 under FSDP needs loss"),
])
def test_unsupported_combinations_are_refused_naming_the_key(kw, message):
    with pytest.raises(UserError) as e:
        _check_supported(**kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_supported_combinations_pass():
    _check_supported()
    _check_supported(cfg={"objective": "ppo"}, critic_mode="separate")  # the critic stays replicated
    _check_supported(half="bf16", dtype="bf16", device_type="cuda", accelerate_precision="bf16")


@pytest.mark.parametrize("env, outcome", [
    ({}, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"},
     fsdp.FsdpSettings(reshard_after_forward=False)),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"},
     fsdp.FsdpSettings(reshard_after_forward=True)),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_config.fsdp_version: 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
     "fsdp_config.fsdp_offload_params: true is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     "fsdp_config.fsdp_activation_checkpointing: true is not supported"),
])
def test_launch_settings_are_read_from_accelerates_environment(monkeypatch, env, outcome):
    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS",
              "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if isinstance(outcome, str):
        with pytest.raises(UserError, match="accelerate " + outcome.replace(".", r"\.")):
            fsdp.requested()
    else:
        assert fsdp.requested() == outcome


def _fsdp(tmp, base, out, *extra, cli=None):
    return _train(tmp, base, out, 2, *extra, config="fsdp_cpu.yaml", cli=cli)


def _same_run(a: list[dict], b: list[dict]) -> None:
    """Row by row the same keys, every metric within float tolerance."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert set(x) == set(y), x["step"]
        for k in set(x) - set(NOT_GLOBAL):
            assert y[k] == pytest.approx(x[k], rel=RTOL, abs=ATOL), (x["step"], k)


def _weights_close(a: Path, b: Path) -> None:
    wa, wb = load_file(a), load_file(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k


@pytest.mark.slow
def test_fsdp_grpo_matches_one_process_writes_once_and_resumes(coin_checkpoint, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    one = _train(tmp_path, coin_checkpoint, "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _fsdp(tmp_path, coin_checkpoint, "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.split() == [str(tmp_path / "two" / "model")]  # one process speaks

    a, b = assert_matches_one_process(tmp_path / "one", tmp_path / "two")
    info = json.loads((tmp_path / "two" / "train.json").read_text())
    assert (info["processes"], info["parallelism"]) == (2, "fsdp")
    # full weights in the one-process layout, in the final model and in the checkpoints
    for sub in ("model", "checkpoints/step-2"):
        _weights_close(tmp_path / "one" / sub / "model.safetensors", tmp_path / "two" / sub / "model.safetensors")
        assert json.loads((tmp_path / "two" / sub / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    base = load_file(coin_checkpoint / "model.safetensors")
    wb = load_file(tmp_path / "two/model/model.safetensors")
    assert any(not torch.equal(wb[k], base[k]) for k in wb)

    # stopped after the checkpoint at step 2: resumed by 2 FSDP processes, it ends where the whole run did
    stopped = stopped_at_step_2(tmp_path, coin_checkpoint)
    replicated = _train(tmp_path, coin_checkpoint, "stopped", 2, "--resume")
    assert replicated.returncode != 0
    assert "was written by a run with FSDP; resume it the same way" in replicated.stderr, replicated.stderr[-2000:]
    again = _fsdp(tmp_path, coin_checkpoint, "stopped", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(stopped)) == strip(b)
    wc = load_file(stopped / "model/model.safetensors")
    assert all(torch.equal(wb[k], wc[k]) for k in wb)
    assert json.loads((stopped / "train.json").read_text())["resumed_from_step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "ppo", "ei"])
def test_fsdp_sft_ppo_ei_with_curves_match_one_process(coin_checkpoint, tmp_path, method):
    """Training curves (greedy evaluations by the main process on gathered weights) included."""
    (tmp_path / "more.yaml").write_text(MORE)
    script = lambda out: [str(ROOT / "tests" / "train_curves.py"), str(tmp_path / "more.yaml"), method,  # noqa: E731
                          str(coin_checkpoint), str(tmp_path / out)]
    one = _train(tmp_path, coin_checkpoint, "one", 1, cli=script("one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _fsdp(tmp_path, coin_checkpoint, "two", cli=script("two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    _same_run(a, b)
    assert all(f"eval/coin/{s}/acc" in b[i] for s in ("id", "ood") for i in (0, 2, -1))
    assert any(r["loss"] != 0 for r in a[1:])
    _weights_close(tmp_path / "one/model/model.safetensors", tmp_path / "two/model/model.safetensors")
    if method == "ei":
        assert (tmp_path / "two/rounds/round-1.json").read_text() == (tmp_path / "one/rounds/round-1.json").read_text()
    if method == "ppo":
        assert any(r["critic_grad_norm"] > 0 for r in b[1:])
        _weights_close(tmp_path / "one/critic/model.safetensors", tmp_path / "two/critic/model.safetensors")


@pytest.mark.slow
def test_fsdp_refuses_lora_before_writing(coin_checkpoint, tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG.replace("trackers: [none]}", "trackers: [none], lora: {r: 2}}"))
    p = _fsdp(tmp_path, coin_checkpoint, "out")
    assert p.returncode != 0 and "exitcode: 2" in " ".join(p.stderr.split())
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors and set(errors) == {"error: methods.m.lora: LoRA is not supported under FSDP (launch with a DDP config)"}
    assert not (tmp_path / "out").exists()


def test_the_units_sharded_are_the_decoder_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert fsdp._layers(model) == list(model.model.layers)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))  # names no unsplittable class
    assert fsdp._layers(plain) == []
    with pytest.raises(UserError, match=r"^Sequential names no decoder layer class \(_no_split_modules\); FSDP cannot"):
        fsdp.shard(plain, fsdp.FsdpSettings(reshard_after_forward=True), torch.device("cpu"))
