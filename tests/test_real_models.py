"""Real-model features on tiny local stand-ins: chat templates, LoRA, the rollout backend choice."""

from pathlib import Path

import pytest
import torch

from posttrain.config import ModelConfig, load_study_config, preset_path
from posttrain.models.loading import load_model, save_checkpoint
from posttrain.models.tiny import build_char_tokenizer, build_chat_tokenizer, build_tiny_model
from posttrain.train.sequences import encode_completions, encode_prompts

TINY = ModelConfig(arch="qwen2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_length=128)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 'instruct' model: random weights, a tokenizer with a chat template."""
    tok = build_chat_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    model.config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("chat") / "instruct"
    save_checkpoint(model, tok, path)
    return path


def test_chat_prompts_are_apply_chat_template_ids(chat_checkpoint):
    _, tok = load_model(chat_checkpoint)
    prompts = ["What is 2 plus 3?", "Make 24 from 1 2 3 4."]
    want = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)
            for p in prompts]
    want = [w["input_ids"] if not isinstance(w, list) else w for w in want]
    got = encode_prompts(tok, prompts)
    assert got == want
    start, gen = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert got[0][0] == start and got[0].count(gen) == 1  # one user turn, then the assistant header
    assert tok.decode(got[0]).endswith("<|im_start|>assistant ")
    # none: the prompt as it is, after BOS
    _, plain = load_model(chat_checkpoint, chat_template="none")
    assert encode_prompts(plain, prompts) == [[plain.bos_token_id, *plain(p, add_special_tokens=False)["input_ids"]]
                                              for p in prompts]


def test_chat_mode_is_not_saved_with_the_tokenizer(chat_checkpoint, tmp_path):
    model, tok = load_model(chat_checkpoint, chat_template="none")
    save_checkpoint(model, tok, tmp_path / "again")
    _, again = load_model(tmp_path / "again")
    assert again.chat_template and encode_prompts(again, ["x"]) == encode_prompts(load_model(chat_checkpoint)[1], ["x"])


def test_sft_scores_only_the_completion_under_a_chat_template(chat_checkpoint):
    from posttrain.tasks import build_task
    from posttrain.train.data_sources import ExpertSource

    _, tok = load_model(chat_checkpoint)
    task = build_task("arith")
    import random

    problems = [task.sample(random.Random(i), "id") for i in range(3)]
    fmt = task.solution_formats[0]
    batch = ExpertSource(task, fmt, seed=0, max_length=None).batch(0, problems, 1, None, tok, None)
    prompt_ids = encode_prompts(tok, [p.prompt for p in problems])
    for i, p in enumerate(problems):
        ids = batch.packed.input_ids[i]
        n = int(batch.packed.attention_mask[i].sum())
        targets = ids[1:][batch.packed.target_mask[i].bool()].tolist()
        assert ids[: len(prompt_ids[i])].tolist() == prompt_ids[i]  # the templated prompt is the context
        assert targets == encode_completions(tok, [task.solve(p, fmt)])[0]  # scored: completion + <|im_end|>
        assert targets[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(prompt_ids[i]) + len(targets) == n


def test_tiny_world_prompts_are_byte_identical_under_auto():
    tok = build_char_tokenizer()
    assert not tok.chat_template
    cfg = load_study_config(preset_path("default"))
    assert cfg.chat_template == "auto" and cfg.base_model is None
    from posttrain.tasks import build_task
    import random

    task = build_task("points24")
    prompts = [task.sample(random.Random(i), "id").prompt for i in range(5)]
    assert encode_prompts(tok, prompts) == [[tok.bos_token_id, *[tok.convert_tokens_to_ids(c) for c in p]] for p in prompts]


def test_chat_template_config_is_checked():
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="chat_template"):
        load_study_config(preset_path("quick"), ["chat_template=always"])


def test_char_tokenizer_of_a_qwen2_checkpoint_keeps_spaces(chat_checkpoint):
    # transformers 5 would read it as Qwen2Tokenizer (model type) and drop the spaces
    _, tok = load_model(chat_checkpoint)
    ids = tok("a b", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and tok.decode(ids) == "a b" and len(tok) == len(build_chat_tokenizer())


# -- LoRA ------------------------------------------------------------------------------------

def _lora_sft(init, out, resume=False, **kw):
    from posttrain.config import TrainConfig
    from posttrain.tasks import build_task
    from posttrain.train.loop import train

    c = TrainConfig(**{**dict(task="coin", objective="sft", data="expert", steps=3, prompts_per_step=2,
                              samples_per_prompt=2, lr=1e-2, trackers=["none"], checkpoint_every=1,
                              lora={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}), **kw})
    return train(c, init_dir=init, ref_dir=None, out_dir=out, task=build_task("coin"), expert_format="default",
                 seed=0, device="cpu", resume=resume)


def test_merged_state_dict_is_peft_merge_and_unload():
    import copy

    from posttrain.config import LoraSpec
    from posttrain.train.lora import attach, merged_state_dict

    model = build_tiny_model(TINY, 98, seed=0)
    names = set(model.state_dict())
    lora = attach(model, LoraSpec(r=2, alpha=3, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_()  # B starts at zero: make the delta non-zero
    want = copy.deepcopy(lora.wrapper).merge_and_unload().state_dict()
    got = merged_state_dict(model)
    assert set(got) == names == set(want)
    assert all(torch.equal(got[k], want[k]) for k in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * (2 * 32 + 32 + 64)


def test_lora_sft_changes_only_targeted_matrices_and_resumes_bitwise(chat_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    res = _lora_sft(chat_checkpoint, tmp_path / "a")
    base = load_file(str(chat_checkpoint / "model.safetensors"))
    merged = load_file(str(res.model_dir / "model.safetensors"))
    assert set(merged) == set(base)  # exactly the base's tensor names: no lora_ or base_layer names
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    targeted = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == targeted and len(targeted) == 2 * TINY.num_layers
    # r * (in + out) per adapted matrix: q_proj and v_proj are 32 -> 32 here
    assert res.trainable_params == TINY.num_layers * 2 * 2 * (32 + 32) < res.total_params
    for step in (1, 2, 3):  # kept checkpoints are merged full models too
        assert set(load_file(str(tmp_path / "a" / "checkpoints" / f"step-{step}" / "model.safetensors"))) == set(base)
    # resume from step 1: the same adapters, the same merged model, bit for bit
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    for p in ("checkpoints/step-2", "checkpoints/step-3", "model"):
        shutil.rmtree(b / p)
    (b / "train.json").unlink()
    _lora_sft(chat_checkpoint, b, resume=True)
    assert json_of(b / "train.json")["resumed_from_step"] == 1
    for rel in ("model/model.safetensors", "model/adapter/adapter.safetensors"):
        x, y = load_file(str(tmp_path / "a" / rel)), load_file(str(b / rel))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), rel


def json_of(path):
    import json

    return json.loads(Path(path).read_text())


def test_lora_config_is_checked():
    from pydantic import ValidationError

    from posttrain.config import TrainConfig

    with pytest.raises(ValidationError, match="freeze"):
        TrainConfig(objective="sft", lora={"r": 4}, freeze=["*.mlp.*"])
    with pytest.raises(ValidationError, match="rank|r\\b|greater"):
        TrainConfig(objective="sft", lora={"r": 0})
    with pytest.raises(ValidationError, match="extra|rank_typo"):
        TrainConfig(objective="sft", lora={"rank_typo": 4})


def test_lora_target_that_matches_nothing_is_a_user_error(chat_checkpoint, tmp_path):
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="lora.target_modules"):
        _lora_sft(chat_checkpoint, tmp_path / "x", lora={"target_modules": ["nope_proj"]})
    assert not (tmp_path / "x" / "model").exists()


@pytest.mark.parametrize("kw", [dict(objective="grpo", data=None, samples_per_prompt=4, max_new_tokens=4),
                                dict(objective="ppo", data=None, samples_per_prompt=2, max_new_tokens=4, critic="shared")])
def test_lora_rl_methods_train_only_targets(coin_checkpoint, tmp_path, kw):
    from safetensors.torch import load_file

    # the coin model earns mixed rewards (a random one earns none, so RL would not move)
    res = _lora_sft(coin_checkpoint, tmp_path / "a", checkpoint_every=0, **kw)
    base, merged = load_file(str(coin_checkpoint / "model.safetensors")), load_file(str(res.model_dir / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and changed <= {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}


# -- rollout backends ------------------------------------------------------------------------

def test_rollout_backend_config_is_checked():
    from pydantic import ValidationError

    from posttrain.config import TrainConfig

    assert TrainConfig(objective="grpo").rollout.backend == "builtin"
    assert TrainConfig(objective="grpo", rollout={"backend": "vllm"}).rollout.gpu_memory_utilization == 0.3
    with pytest.raises(ValidationError, match="backend"):
        TrainConfig(objective="grpo", rollout={"backend": "sglang"})
    with pytest.raises(ValidationError, match="samples nothing"):
        TrainConfig(objective="sft", data="expert", rollout={"backend": "vllm"})
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        TrainConfig(objective="grpo", rollout={"backend": "vllm", "gpu_memory_utilization": 1.5})


def test_vllm_falls_back_to_the_builtin_sampler_with_one_notice(coin_checkpoint, tmp_path, capfd, monkeypatch):
    import json

    from posttrain.train import vllm_rollout

    monkeypatch.setattr(vllm_rollout, "_NOTICES", set())
    kw = dict(objective="grpo", data=None, samples_per_prompt=4, max_new_tokens=4, checkpoint_every=0, lora=None)
    a = _lora_sft(coin_checkpoint, tmp_path / "a", **kw)
    b = _lora_sft(coin_checkpoint, tmp_path / "b", rollout={"backend": "vllm"}, **kw)
    c = _lora_sft(coin_checkpoint, tmp_path / "c", rollout={"backend": "vllm"}, **kw)
    err = capfd.readouterr().err
    why = vllm_rollout.unavailable_reason("cpu")
    assert why in ("vllm is not installed", "the run is on the CPU")
    assert err.count("rollout.backend vllm unavailable") == 1  # one line, once per process
    assert json.loads((tmp_path / "a" / "train.json").read_text())["rollout_backend"] == "builtin"
    for run in (b, c):
        assert json.loads((run.model_dir.parent / "train.json").read_text())["rollout_backend"] == f"builtin (fallback: {why})"
    from safetensors.torch import load_file

    x, y = load_file(str(a.model_dir / "model.safetensors")), load_file(str(b.model_dir / "model.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)  # the fallback is the built-in sampler, sample for sample


class _FakeCompletion:
    def __init__(self, ids, reason):
        self.token_ids, self.finish_reason = ids, reason


class _FakeOutput:
    def __init__(self, *outs):
        self.outputs = list(outs)


def test_vllm_fallback_reasons(monkeypatch):
    from posttrain.train import vllm_rollout

    monkeypatch.setattr(vllm_rollout, "_NOTICES", set())
    assert vllm_rollout.resolve_backend("builtin", "cuda") == ("builtin", "builtin")
    backend, label = vllm_rollout.resolve_backend("vllm", "cuda", processes=2)
    assert backend == "builtin" and label == "builtin (fallback: the colocated engine serves one process; this run has several)"
    monkeypatch.setattr(vllm_rollout.importlib.util, "find_spec", lambda name: object())  # as if vllm were installed
    assert vllm_rollout.unavailable_reason("cpu") == "the run is on the CPU"
    monkeypatch.setattr(vllm_rollout.torch.cuda, "is_available", lambda: False)
    assert vllm_rollout.unavailable_reason("cuda") == "no CUDA GPU"
    monkeypatch.setattr(vllm_rollout.torch.cuda, "is_available", lambda: True)
    assert vllm_rollout.resolve_backend("vllm", "cuda") == ("vllm", "vllm")


def test_vllm_outputs_become_rollouts_with_eos():
    from posttrain.train.vllm_rollout import completions_from_outputs

    outs = [_FakeOutput(_FakeCompletion([5, 6, 2], "stop"), _FakeCompletion([7], "stop")),
            _FakeOutput(_FakeCompletion([8, 9], "length"), _FakeCompletion([], "stop"))]
    ids, fin = completions_from_outputs(outs, eos=2)
    assert ids == [[5, 6, 2], [7, 2], [8, 9], [2]] and fin == [True, True, False, True]


def test_vllm_engine_syncs_the_policy_weights_before_sampling(tiny_checkpoint, monkeypatch):
    """The engine path up to vLLM itself, on a stand-in for `LLM`: the policy's current tensors by
    their HF names reach model_runner.model.load_weights before every generate call, and completions
    come back through the sampler's `Rollouts` (the real engine needs vLLM and a GPU)."""
    import sys
    import types

    from posttrain.train.rollout import generate
    from posttrain.train.vllm_rollout import ENGINE_ATTR, VllmEngine

    model, tok = load_model(tiny_checkpoint)
    loaded, calls = [], []

    class Runner:
        class model:  # noqa: N801 - mirrors vLLM's attribute path
            @staticmethod
            def load_weights(items):
                loaded.append({n: t.clone() for n, t in items})

    class FakeLLM:
        llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(
            model_runner=Runner)))

        def reset_prefix_cache(self):
            calls.append("reset")

        def generate(self, prompts, sampling_params, use_tqdm):
            calls.append(("generate", [p["prompt_token_ids"] for p in prompts], [s.n for s in sampling_params]))
            return [_FakeOutput(*[_FakeCompletion([tok.convert_tokens_to_ids("a")], "stop")] * sp.n)
                    for sp in sampling_params]

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    setattr(model, ENGINE_ATTR, VllmEngine(tiny_checkpoint, lambda: model.state_dict().items(), gpu_memory_utilization=0.3,
                                           max_model_len=None, dtype=torch.float32, seed=0, llm=FakeLLM()))
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # an optimizer step
    ro = generate(model, tok, ["ab", "cd"], n=3, max_new_tokens=4, generator=torch.Generator().manual_seed(3))
    assert ro.texts == ["a"] * 6 and ro.finished == [True] * 6 and ro.completion_ids[0][-1] == tok.eos_token_id
    assert calls[0] == "reset" and calls[1][0] == "generate" and calls[1][2] == [3, 3]
    assert calls[1][1] == encode_prompts(tok, ["ab", "cd"])
    assert set(loaded[0]) == set(model.state_dict())
    assert torch.equal(loaded[0]["model.norm.weight"], model.model.norm.weight)  # the updated weights, not the init's


# -- example GPU configs ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2.5-0.5b-gsm8k.yaml", "generalpoints-sft-ppo.yaml"])
def test_example_gpu_configs_load_and_validate_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # task files are relative to the repository root
    cfg = load_study_config(Path("configs") / name)
    assert cfg.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.chat_template == "auto" and cfg.dtype == "bf16"
    assert cfg.repair.sources == ["base", "sft_peak_ood"] and cfg.repair.damaged == "sft"
    assert cfg.diagnostics.spectral and cfg.diagnostics.trajectory
    rl = [m for m in cfg.methods.values() if m.is_rl]
    assert rl and all(m.rollout.backend == "vllm" for m in rl)
    assert "mmlu" in [r.lm_eval for r in cfg.lm_eval_retention]
    if name.startswith("qwen"):
        assert {m.data_source for m in cfg.methods.values()} == {"expert", "on_policy", "filtered"}
        assert cfg.id_task.task == "gsm8k" and "gpqa_diamond_zeroshot" in [r.lm_eval for r in cfg.lm_eval_retention]
    else:
        assert cfg.id_task.key != cfg.ood_task.key and {m.objective for m in rl} == {"ppo"}
        assert {m.init for m in rl} == {"sft@peak_ood", "sft@step-100", "sft@end"}
        assert all(g["method"] == "uv_merge" for g in cfg.repair.grid)


def test_new_knobs_leave_existing_stage_keys_alone():
    from posttrain.config import StudyConfig, TrainConfig
    from posttrain.study import method_key, pretrain_key

    m = TrainConfig(objective="grpo")
    assert "lora" not in method_key(m) and "rollout" not in method_key(m)
    assert method_key(TrainConfig(objective="grpo", lora={"r": 4}))["lora"]["r"] == 4
    assert method_key(TrainConfig(objective="grpo", rollout={"backend": "vllm"}))["rollout"]["backend"] == "vllm"
    cfg = load_study_config(preset_path("quick"))
    keys = {pretrain_key(cfg)}
    keys.add(pretrain_key(StudyConfig.model_validate({**cfg.model_dump(mode="json"), "chat_template": "none"})))
    keys.add(pretrain_key(StudyConfig.model_validate({**cfg.model_dump(mode="json"), "dtype": "bf16"})))
    assert len(keys) == 3  # a non-default load option is part of the base's key
