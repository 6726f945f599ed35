"""DriftCallback inside TRL's SFTTrainer and a plain transformers.Trainer: its logged numbers are
`posttrain diff`'s numbers on the checkpoints it keeps."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.analysis.diff import diff
from posttrain.analysis.trajectory import trajectory
from posttrain.config import ModelConfig
from posttrain.errors import UserError
from posttrain.integrations import DriftCallback
from posttrain.models.tiny import build_char_tokenizer, build_tiny_model

TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_length=96)


def _model_and_tok():
    tok = build_char_tokenizer()
    return build_tiny_model(TINY, len(tok), seed=0), tok


def _drift_logs(history: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in history if "drift/rel_update" in r}


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _assert_matches_diff(logged: dict, start, ckpt) -> None:
    """Every logged number against `posttrain diff` of (start, checkpoint)."""
    res = diff(start, {"ck": ckpt}, None, plots=False, show_progress=False, spectral=True)
    s = res.summaries["ck"]
    assert _close(logged["drift/rel_update"], s.rel_update_total)
    assert _close(logged["drift/changed_frac"], s.changed_frac)
    for m, v in s.rel_update_by_module.items():
        assert _close(logged[f"drift/rel_update/{m}"], v), m
    for i, v in enumerate(s.rel_update_by_layer):
        assert _close(logged[f"drift/rel_update/layer{i:02d}"], v)
    cells = 0
    for m, per_layer in s.rel_update_by_layer_module.items():
        for i, v in enumerate(per_layer):
            if v is not None:
                assert _close(logged[f"drift/rel_update/layer{i:02d}/{m}"], v), (i, m)
                cells += 1
    assert cells >= 14  # 2 layers x 7 projections, plus norms
    for m, v in s.changed_frac_by_module.items():
        assert _close(logged[f"drift/changed_frac/{m}"], v), m
    rows = res.tables["ck"].set_index("name")
    angled = [k.split("/", 2)[2] for k in logged if k.startswith("drift/angle_top_left/")]
    assert angled
    for name in angled:
        assert _close(logged[f"drift/angle_top_left/{name}"], rows.loc[name, "angle_top_left"])
        assert _close(logged[f"drift/angle_top_right/{name}"], rows.loc[name, "angle_top_right"])


def test_drift_callback_in_trl_sft_trainer_matches_posttrain_diff(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = _model_and_tok()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ds = Dataset.from_dict({"text": [f"arith {i}+{i}={2 * i}" for i in range(16)]})
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=["tensorboard"], save_strategy="no", use_cpu=True, max_length=64,
                     seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    cb = DriftCallback(trainer, every=1, save_every=1, out_dir=tmp_path / "drift")
    trainer.add_callback(cb)
    trainer.train()

    logged = _drift_logs(trainer.state.log_history)
    assert sorted(logged) == [1, 2, 3]
    # the trainer's own loss log of each step is still there (logging the drift must not swallow it)
    assert sorted(r["step"] for r in trainer.state.log_history if "loss" in r) == [1, 2, 3]
    for step in (1, 2, 3):
        _assert_matches_diff(logged[step], tmp_path / "drift/start", tmp_path / f"drift/checkpoints/step-{step}")
    # and against the weights before training, computed here: the snapshot is the true start
    w1 = load_file(tmp_path / "drift/checkpoints/step-1/model.safetensors")
    d_sq = sum(float((w1[k].double() - init[k].double()).pow(2).sum()) for k in w1)
    b_sq = sum(float(init[k].double().pow(2).sum()) for k in w1)
    assert _close(logged[1]["drift/rel_update"], math.sqrt(d_sq / b_sq))
    assert 0 < logged[1]["drift/rel_update"] < logged[3]["drift/rel_update"]
    # default angle matrices: q_proj and down_proj of the first and last layer
    names = sorted(k.split("/", 2)[2] for k in logged[3] if k.startswith("drift/angle_top_left/"))
    assert names == sorted(f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj"))
    # the same numbers in drift.jsonl and in TensorBoard (through the trainer's reporting callback)
    lines = [json.loads(x) for x in (tmp_path / "drift/drift.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines == cb.history
    assert all(lines[i]["drift/rel_update"] == logged[i + 1]["drift/rel_update"] for i in range(3))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "out").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/drift/rel_update")}
    assert sorted(tb) == [1, 2, 3] and all(_close(tb[s], logged[s]["drift/rel_update"], 1e-6) for s in tb)


def _lm_rows(tok, n: int = 16, length: int = 24) -> list[dict]:
    rows = []
    for i in range(n):
        ids = tok(f"str rev {'abcdefgh'[i % 8:]}{i}:".ljust(length, "."), add_special_tokens=False)["input_ids"][:length]
        rows.append({"input_ids": torch.tensor(ids), "attention_mask": torch.ones(length, dtype=torch.long),
                     "labels": torch.tensor(ids)})
    return rows


def _plain_trainer(tmp_path, model, tok, **kw):
    from transformers import Trainer, TrainingArguments, default_data_collator

    kw = {"save_strategy": "no", **kw}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, train_dataset=_lm_rows(tok), data_collator=default_data_collator)


def test_drift_callback_in_plain_trainer_and_trajectory_of_its_checkpoints(tmp_path):
    model, tok = _model_and_tok()
    trainer = _plain_trainer(tmp_path, model, tok)
    cb = DriftCallback(every=2, save_every=2, angles_for=["*.self_attn.v_proj.weight"]).attach(trainer)
    trainer.train()
    logged = _drift_logs(trainer.state.log_history)
    assert sorted(logged) == [2, 3]  # every 2 steps, and the last step
    drift_dir = tmp_path / "out/drift"  # the default: <output_dir>/drift
    for step in (2, 3):
        _assert_matches_diff(logged[step], drift_dir / "start", drift_dir / f"checkpoints/step-{step}")
    assert sorted(k for k in logged[3] if k.startswith("drift/angle_top_left/")) == [
        f"drift/angle_top_left/model.layers.{i}.self_attn.v_proj.weight" for i in (0, 1)]
    # `posttrain diff --trajectory` reads the layout: start/ is the base, checkpoints/step-<N>/ the points
    tr = trajectory(drift_dir / "start", [drift_dir], plots=False, show_progress=False)
    points = {p["step"]: p for p in tr.points}
    assert sorted(points) == [2, 3]
    for step, p in points.items():
        assert _close(p["rel_update_total"], logged[step]["drift/rel_update"])
        assert _close(p["rel_update/q_proj"], logged[step]["drift/rel_update/q_proj"])


def test_drift_callback_misuse_is_a_one_line_error(tmp_path):
    model, tok = _model_and_tok()
    trainer = _plain_trainer(tmp_path, model, tok)
    trainer.add_callback(DriftCallback(every=1))  # no trainer to log through
    with pytest.raises(UserError, match="needs its trainer"):
        trainer.train()
    with pytest.raises(UserError, match="every must be a positive"):
        DriftCallback(every=0)
    with pytest.raises(UserError, match="top_frac"):
        DriftCallback(top_frac=2.0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/drift.jsonl").write_text("{}\n")
    trainer = _plain_trainer(tmp_path, model, tok)
    DriftCallback(trainer, out_dir=tmp_path / "busy").attach(trainer)
    with pytest.raises(UserError, match="busy exists and is not empty"):
        trainer.train()
    assert (tmp_path / "busy/drift.jsonl").read_text() == "{}\n"  # untouched
    trainer = _plain_trainer(tmp_path, model, tok)
    DriftCallback(trainer, out_dir=tmp_path / "d2", angles_for=["*nothing*"]).attach(trainer)
    with pytest.raises(UserError, match="'\\*nothing\\*' matches no weight matrix"):
        trainer.train()


def test_drift_callback_in_trl_grpo_trainer_keeps_grpos_own_metrics(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = _model_and_tok()
    ds = Dataset.from_dict({"prompt": [f"coin {i}:" for i in range(8)]})

    def distinct_chars(completions, **kw):  # varies between a group's samples: non-zero advantages
        return [len(set(c)) / 8 for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                      use_cpu=True, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=distinct_chars, args=args, train_dataset=ds, processing_class=tok)
    DriftCallback(trainer, every=1, save_every=3, out_dir=tmp_path / "drift").attach(trainer)
    trainer.train()
    logged = _drift_logs(trainer.state.log_history)
    assert sorted(logged) == [1, 2, 3] and logged[3]["drift/rel_update"] > 0
    _assert_matches_diff(logged[3], tmp_path / "drift/start", tmp_path / "drift/checkpoints/step-3")
    # GRPO's per-step metrics (averaged in its own `log`) are still logged at every step
    assert sorted(r["step"] for r in trainer.state.log_history if "reward" in r and "loss" in r) == [1, 2, 3]


@pytest.mark.slow  # two short trainings
def test_resumed_training_measures_from_the_original_start(tmp_path):
    model, tok = _model_and_tok()
    trainer = _plain_trainer(tmp_path, model, tok, save_strategy="steps", save_steps=2)
    DriftCallback(trainer, every=1, out_dir=tmp_path / "drift").attach(trainer)
    trainer.train()
    full = _drift_logs(trainer.state.log_history)

    model2, _ = _model_and_tok()
    resumed = _plain_trainer(tmp_path, model2, tok, save_strategy="steps", save_steps=2)
    cb = DriftCallback(resumed, every=1, save_every=1, out_dir=tmp_path / "drift").attach(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out/checkpoint-2"))
    logged = _drift_logs(resumed.state.log_history)  # steps 1 and 2 come back with the restored state
    assert sorted(logged) == [1, 2, 3] and [h["step"] for h in cb.history] == [3]
    _assert_matches_diff(logged[3], tmp_path / "drift/start", tmp_path / "drift/checkpoints/step-3")
    # from the weights before step 1, not from the resumed step-2 weights: as far as the full run got
    assert logged[3]["drift/rel_update"] == pytest.approx(full[3]["drift/rel_update"], rel=1e-3)
    steps = [json.loads(x)["step"] for x in (tmp_path / "drift/drift.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # the resumed run appends


def test_drift_callback_refuses_sharded_or_adapter_weights_before_writing(tmp_path):
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True, global_step=0)
    cb = DriftCallback(SimpleNamespace(), out_dir=tmp_path / "d")
    model, tok = _model_and_tok()
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="^DriftCallback: the model is a PEFT model"):
        cb.on_train_begin(args, state, None, model=lora, processing_class=tok)
    model, tok = _model_and_tok()
    next(model.parameters()).ds_numel = 10  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(UserError, match="^DriftCallback: model.embed_tokens.weight is partitioned by DeepSpeed ZeRO-3"):
        cb.on_train_begin(args, state, None, model=model, processing_class=tok)
    assert not (tmp_path / "d").exists()


def test_drift_callback_refuses_fsdp2_dtensor_parameters(tmp_path):
    import torch.distributed as dist
    from types import SimpleNamespace

    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, tok = _model_and_tok()
        fully_shard(model)
        cb = DriftCallback(SimpleNamespace(), out_dir=tmp_path / "d")
        with pytest.raises(UserError, match="^DriftCallback: model.embed_tokens.weight is a sharded DTensor"):
            cb.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)),
                              SimpleNamespace(is_world_process_zero=True, global_step=0), None, model=model,
                              processing_class=tok)
    finally:
        dist.destroy_process_group()
    assert not (tmp_path / "d").exists()
