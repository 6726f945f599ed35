"""The shared training loop: every method runs, ratio is 1 at mu=1, freezing, resume, divergence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.analysis.format_shares import format_series
from posttrain.config import TrainConfig
from posttrain.errors import TrainingDiverged, UserError
from posttrain.tasks import build_task
from posttrain.train.checkpointing import latest_checkpoint
from posttrain.train.loop import train
from posttrain.train.objectives import OBJECTIVES, SFT, register_objective
from procs import sigkill_when

ROOT = Path(__file__).resolve().parents[1]


def cfg(**kw):
    base = dict(task="coin", steps=3, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=4, lr=1e-3, trackers=["none"])
    base.update(kw)
    return TrainConfig(**base)


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("kw", [
    dict(objective="sft", data="expert"),
    dict(objective="grpo"),
    dict(objective="grpo", kl_coef=0.1, kl_estimator="k2"),
    dict(objective="grpo", kl_coef=0.1, kl_mode="reward", adv_norm_std=False, loss_agg="seq-mean-token-sum-norm"),
    dict(objective="rloo", loss_agg="seq-mean-token-mean"),
    dict(objective="ppo", entropy_coef=0.01, kl_coef=0.05, kl_mode="reward"),
    dict(objective="ppo", num_iterations=2, minibatches=2, critic="shared"),
    dict(objective="sft", data="filtered", rounds=2),
    dict(objective="sft", data="filtered", rounds=1, kl_coef=0.1),
])
def test_every_method_runs_and_changes_weights(coin_checkpoint, tmp_path, kw):
    tiny_checkpoint = coin_checkpoint
    res = train(cfg(**kw), init_dir=tiny_checkpoint, ref_dir=tiny_checkpoint, out_dir=tmp_path, task=build_task("coin"),
                expert_format="default", seed=0, device="cpu")
    log = rows(res.metrics_path)
    assert log[0]["step"] == 0 and log[0]["trainable_params"] == log[0]["total_params"] > 0
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    trained = [r for r in log[1:] if "loss" in r]
    assert trained, "no update happened"
    for r in trained:
        assert "kl_ref" in r  # the KL to the base is measured even when its coefficient is 0
    a, b = weights(tiny_checkpoint), weights(res.model_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    if kw.get("objective") == "ppo":
        shared = kw.get("critic") == "shared"
        assert (tmp_path / "value_head.safetensors").is_file() == shared
        assert (tmp_path / "critic" / "value_head.safetensors").is_file() != shared
        assert set(b) == set(a)  # the policy checkpoint never holds critic weights
    if kw.get("data") == "filtered":
        assert (tmp_path / "rounds" / "round-0.json").is_file()
    # the formats of the completions sampled while training (rl_format_collapse): every RL step, one
    # point per Expert Iteration round; SFT on expert data samples nothing
    pts = format_series(log)
    if kw.get("data") == "expert":
        assert pts == []
    else:
        want = [1, 3][:kw["rounds"]] if kw.get("data") == "filtered" else [1, 2, 3]
        assert [p["step"] for p in pts] == want
        for p in pts:
            assert p["samples"] > 0 and 0 <= sum(p["shares"].values()) <= 1 + 1e-9 and set(p["shares"]) <= {"default"}


def test_grpo_ratio_is_exactly_one_at_mu_1_and_not_after(coin_checkpoint, tmp_path):
    tiny_checkpoint = coin_checkpoint
    res = train(cfg(objective="grpo", steps=2), init_dir=tiny_checkpoint, ref_dir=tiny_checkpoint, out_dir=tmp_path / "a",
                task=build_task("coin"), expert_format=None, seed=0, device="cpu")
    trained = [r for r in rows(res.metrics_path)[1:] if "ratio_mean" in r]
    assert trained and all(r["ratio_mean"] == 1.0 and r["clipfrac"] == 0.0 for r in trained)
    res = train(cfg(objective="grpo", steps=2, num_iterations=3, lr=3e-3), init_dir=tiny_checkpoint, ref_dir=tiny_checkpoint,
                out_dir=tmp_path / "b", task=build_task("coin"), expert_format=None, seed=0, device="cpu")
    # the metrics of the last (third) update: the policy has moved away from the behaviour policy
    assert any(r.get("ratio_mean", 1.0) != 1.0 for r in rows(res.metrics_path)[1:])


def test_freezing_keeps_frozen_bitwise_and_counts(tiny_checkpoint, tmp_path):
    c = cfg(objective="sft", data="expert", freeze=["*.mlp.*@1"], train_only=["re:layers\\.[01]\\."])
    res = train(c, init_dir=tiny_checkpoint, ref_dir=None, out_dir=tmp_path, task=build_task("coin"),
                expert_format="default", seed=0, device="cpu")
    a, b = weights(tiny_checkpoint), weights(res.model_dir)
    trainable = [k for k in a if ".layers." in k and not (".layers.1.mlp." in k)]
    frozen = [k for k in a if k not in trainable]
    assert all(torch.equal(a[k], b[k]) for k in frozen)
    assert all(not torch.equal(a[k], b[k]) for k in trainable)
    assert res.trainable_params == sum(a[k].numel() for k in trainable)
    assert res.total_params == sum(a[k].numel() for k in a)


@pytest.mark.parametrize("rule,match", [("*.nothing.*", "matches no parameter"), ("*.mlp.*@7-9", "matches no parameter"),
                                        ("*@3-1", "empty layer range"), ("re:(", "bad regular expression"),
                                        ("*.mlp.*@x", "layer range")])
def test_bad_freeze_rules(tiny_checkpoint, tmp_path, rule, match):
    with pytest.raises(UserError, match=match):
        train(cfg(freeze=[rule]), init_dir=tiny_checkpoint, ref_dir=None, out_dir=tmp_path, task=build_task("coin"),
              expert_format="default", seed=0, device="cpu")


def test_restart_from_base_resets_weights_each_round(coin_checkpoint, tmp_path):
    tiny_checkpoint = coin_checkpoint
    # round 0 (step 1) has data and trains; round 1 (step 2) restarts from the base and has no data
    task = build_task("coin", {"accept_first": 2})
    res = train(cfg(objective="sft", data="filtered", rounds=2, steps=2, restart_from_base=True, checkpoint_every=1),
                init_dir=tiny_checkpoint, ref_dir=None, out_dir=tmp_path, task=task, expert_format=None, seed=0, device="cpu")
    log = rows(res.metrics_path)
    assert "loss" in log[1] and log[2].get("skipped") == 1
    base, step1, final = weights(tiny_checkpoint), weights(tmp_path / "checkpoints" / "step-1"), weights(res.model_dir)
    assert any(not torch.equal(base[k], step1[k]) for k in base)
    assert all(torch.equal(base[k], final[k]) for k in base)


def test_divergence_stops_and_keeps_last_checkpoint(tiny_checkpoint, tmp_path):
    if "nan_after_1" not in OBJECTIVES:
        @register_objective("nan_after_1")
        class NanAfter1(SFT):
            calls = 0

            def compute(self, new, old, ref_logp, batch, targets, c):
                out = super().compute(new, old, ref_logp, batch, targets, c)
                type(self).calls += 1
                if type(self).calls > 1:
                    out.loss = out.loss * float("nan")
                return out
    OBJECTIVES["nan_after_1"].calls = 0
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 2.*step-1"):
        train(cfg(objective="nan_after_1", data="expert", checkpoint_every=1), init_dir=tiny_checkpoint, ref_dir=None,
              out_dir=tmp_path, task=build_task("coin"), expert_format="default", seed=0, device="cpu")
    assert latest_checkpoint(tmp_path).name == "step-1"
    assert not (tmp_path / "model").exists()


def _train_cmd(config: Path, base: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "run_cli.py"), "train", str(config), "--method", method, "--base", str(base),
            "--out", str(out), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_sigkill_then_resume_is_bitwise_identical(coin_checkpoint, tmp_path, method):
    tiny_checkpoint = coin_checkpoint
    config = tmp_path / "c.yaml"
    config.write_text(f"""
methods:
  m: {{method: {method}, task: coin, steps: 8, prompts_per_step: 2, samples_per_prompt: 4, max_new_tokens: 8, lr: 1.0e-3,
       checkpoint_every: 2, trackers: [none], num_iterations: 2}}
""")
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(config, tiny_checkpoint, full, "m"), check=True, env=env, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(config, tiny_checkpoint, killed, "m"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sigkill_when(proc, killed / "checkpoints" / "step-4" / "trainer_state.pt", timeout=300)
    assert not (killed / "model").exists()
    r = subprocess.run(_train_cmd(config, tiny_checkpoint, killed, "m"), env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--resume" in r.stderr  # refuses to clobber an unfinished run
    subprocess.run(_train_cmd(config, tiny_checkpoint, killed, "m", "--resume"), check=True, env=env, capture_output=True, cwd=ROOT)
    assert json.loads((killed / "train.json").read_text())["resumed_from_step"] >= 4  # it did resume, not restart
    a, b = weights(full / "model"), weights(killed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = weights(tiny_checkpoint)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # training did move the weights
    strip = lambda p: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows(p)]  # noqa: E731
    assert strip(full / "metrics.jsonl") == strip(killed / "metrics.jsonl")
    if method == "ppo":  # the separate critic resumes bit for bit too, and stays out of the policy
        assert set(a) == set(base)
        for f in ("model.safetensors", "value_head.safetensors"):
            x, y = load_file(str(full / "critic" / f)), load_file(str(killed / "critic" / f))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert load_file(str(full / "critic" / "value_head.safetensors"))["proj.weight"].abs().sum() > 0


def test_pretraining_resumes_bitwise(tmp_path):
    """A pretraining run cut after its step-4 checkpoint and resumed ends bit-identical."""
    import shutil

    from posttrain.config import ModelConfig, PretrainConfig, TaskRef
    from posttrain.train.pretrain import pretrain

    mc = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_length=96)
    pc = PretrainConfig(steps=6, batch_size=8, checkpoint_every=2, log_every=1, mixture=[TaskRef(task="coin")])
    tasks = {"coin": build_task("coin")}
    full = pretrain(mc, pc, tasks, tmp_path / "a", tmp_path / "a_model", seed=1, device="cpu")
    cut = tmp_path / "b" / "checkpoints"
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-4", cut / "step-4")  # the state a crash at step 5 leaves
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[:5]))
    resumed = pretrain(mc, pc, tasks, tmp_path / "b", tmp_path / "b_model", seed=1, device="cpu", resume=True)
    assert json.loads((tmp_path / "b" / "pretrain.json").read_text())["resumed_from_step"] == 4
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "a" / "metrics.jsonl") == rows(tmp_path / "b" / "metrics.jsonl")


def test_metrics_go_to_tensorboard_by_default(coin_checkpoint, tmp_path):
    pytest.importorskip("tensorboard")  # a dev dependency: installed by `make test`
    res = train(cfg(objective="grpo", steps=2, trackers=["auto"]), init_dir=coin_checkpoint, ref_dir=coin_checkpoint,
                out_dir=tmp_path, task=build_task("coin"), expert_format=None, seed=0, device="cpu")
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "kl_ref" in acc.Tags()["scalars"] and "rollout/reward" in acc.Tags()["scalars"]
    assert len(rows(res.metrics_path)) == 3


def test_canonical_demos_run_once_per_prompt_with_the_same_loss_and_gradient(tiny_checkpoint):
    """n identical canonical demos per prompt give the same SFT loss and gradient as one per
    prompt, for every loss aggregation; the deduplicated batch holds one row per prompt."""
    from posttrain.models.loading import load_model
    from posttrain.train.data_sources import ExpertSource, prompt_schedule
    from posttrain.train.policy import policy_forward

    task = build_task("points24")
    problems = prompt_schedule(task, "id", 0, 1, 4)[0]
    model, tok = load_model(tiny_checkpoint)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        c = TrainConfig(objective="sft", task="points24", loss_agg=agg, trackers=["none"])
        out = {}
        for dedupe in (False, True):
            batch = ExpertSource(task, "steps", 0, None, canonical=True, dedupe=dedupe).batch(0, problems, 5, model, tok, c)
            assert len(batch.texts) == (4 if dedupe else 20)
            model.zero_grad(set_to_none=True)
            new = policy_forward(model, batch.packed)
            loss = SFT().compute(new, new, None, batch, SFT().prepare(batch, new, None, c)[0], c).loss
            loss.backward()
            out[dedupe] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
        assert torch.allclose(out[True][1], out[False][1], rtol=1e-4, atol=1e-7)
    # random demos differ, so they are never merged
    rnd = ExpertSource(task, "steps", 0, None, canonical=False, dedupe=True).batch(0, problems, 5, model, tok, c)
    assert len(rnd.texts) == 20


@pytest.mark.parametrize("objective,agg", [("grpo", "token-mean"), ("grpo", "seq-mean-token-sum-norm"),
                                           ("rloo", "seq-mean-token-mean")])
def test_zero_advantage_groups_skip_the_backward_with_the_same_loss_and_gradient(tiny_checkpoint, objective, agg):
    """Groups whose rewards are all equal have advantage 0: without a KL term their gradient is
    exactly 0, so the update computes them without autograd. Loss, metrics and gradient match the
    all-autograd forward."""
    from posttrain.models.loading import load_model
    from posttrain.train.data_sources import Batch
    from posttrain.train.objectives import PolicyOutputs
    from posttrain.train.policy import policy_forward
    from posttrain.train.sequences import pack

    model, tok = load_model(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    prompts, comps, rewards = [], [], []
    for k, rs in enumerate([[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]]):
        p = tok(f"arith {k}+{k}:")["input_ids"]
        for r in rs:
            prompts.append(p)
            comps.append(torch.randint(3, len(tok), (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist())
            rewards.append(float(r))
    packed = pack(prompts, comps, tok.pad_token_id, group_size=4)
    batch = Batch(packed, 4, [None] * 16, [""] * 16, torch.tensor(rewards))
    c = TrainConfig(objective=objective, task="coin", loss_agg=agg, trackers=["none"])
    obj = OBJECTIVES[objective]()
    assert obj.grad_groups(batch, c) == [1, 3]
    assert obj.grad_groups(batch, c.model_copy(update={"kl_coef": 0.1})) is None
    out = {}
    for groups in (None, obj.grad_groups(batch, c)):
        model.zero_grad(set_to_none=True)
        new = policy_forward(model, batch.packed, grad_groups=groups)
        old = PolicyOutputs(new.logp.detach(), None, None)
        targets, _ = obj.prepare(batch, old, None, c)
        res = obj.compute(new, old, None, batch, targets, c)
        res.loss.backward()
        out[groups is None] = (float(res.loss.detach()), res.metrics["ratio_mean"], new.logp.detach(),
                               torch.cat([p.grad.flatten() for p in model.parameters()]))
    full, split = out[True], out[False]
    assert split[0] == pytest.approx(full[0], rel=1e-5, abs=1e-7) and split[1] == full[1] == 1.0
    m = batch.packed.target_mask.bool()
    assert torch.allclose(split[2][m], full[2][m], atol=1e-5)
    assert full[3].abs().max() > 0 and torch.allclose(split[3], full[3], rtol=1e-4, atol=1e-6)
