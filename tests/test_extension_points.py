"""Extension points: a toy objective, a toy advantage estimator and a toy diagnostic are each one
registration in this file, and the rest of the package picks them up without any other change."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.analysis import diagnostics as D
from posttrain.analysis.diff import diff
from posttrain.config import TrainConfig, build_study_config
from posttrain.errors import UserError
from posttrain.tasks import build_task
from posttrain.train.advantages import ESTIMATORS, register_estimator
from posttrain.train.loop import train
from posttrain.train.objectives import OBJECTIVES, LossOutput, Objective, Targets, Traits, masked_mean, register_objective

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_objective():
    from pydantic import BaseModel

    @register_objective("toy_reinforce")
    class ToyReinforce(Objective):
        """Plain REINFORCE on a registered sequence-level estimator, scaled by a knob of its own."""

        traits = Traits(rl=True, default_data="on_policy")
        estimator_level, default_estimator = "sequence", "rloo"

        class Params(BaseModel):
            toy_scale: float = 1.0

        def prepare(self, batch, old, ref_logp, cfg):
            adv = cfg.estimator_spec.fn(batch.rewards, batch.group_size, **cfg.estimator_params.model_dump())
            return Targets(advantages=cfg.objective_params.toy_scale * adv), {"toy_adv": float(adv.abs().sum())}

        def compute(self, new, old, ref_logp, batch, targets, cfg):
            loss = masked_mean(-targets.advantages.unsqueeze(-1) * new.logp, batch.packed.target_mask)
            return LossOutput(loss, {"toy_loss": float(loss.detach())})

    yield ToyReinforce
    OBJECTIVES.pop("toy_reinforce")


@pytest.fixture
def toy_estimator():
    @register_estimator("toy_max_baseline", needs_groups=True)
    def toy_max_baseline(rewards, group_size, *, toy_offset: float = 0.0):
        r = rewards.float().view(-1, group_size)
        return (r - r.max(dim=1, keepdim=True).values + toy_offset).reshape(-1)

    yield toy_max_baseline
    ESTIMATORS.pop("toy_max_baseline")


@pytest.fixture
def toy_diagnostic():
    def top_sv_ratio(m):
        return {"toy_top_sv_ratio": float(m.ft.S[0] / m.fb.S[0])}

    D.register(D.Diagnostic("toy_top_sv_ratio", top_sv_ratio, columns=("toy_top_sv_ratio",), needs="values",
                            aggregates=(D.Aggregate("toy_top_sv_ratio", scopes=("total", "module"),
                                                    results=("total", "module"), trajectory=("total",)),)))
    yield
    D.unregister("toy_top_sv_ratio")


def cfg(**kw):
    base = dict(task="coin", steps=2, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=4, lr=1e-3, trackers=["none"])
    return TrainConfig(**{**base, **kw})


def test_toy_objective_trains_and_its_knob_is_validated(toy_objective, coin_checkpoint, tmp_path):
    c = cfg(objective="toy_reinforce", toy_scale=2.0)
    assert c.data_source == "on_policy" and c.is_rl and c.estimator_name == "rloo"
    res = train(c, init_dir=coin_checkpoint, ref_dir=coin_checkpoint, out_dir=tmp_path, task=build_task("coin"),
                expert_format=None, seed=0, device="cpu")
    rows = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert all("toy_loss" in r and "toy_adv" in r for r in rows[1:])
    with pytest.raises(ValueError, match="vf_coef does not apply to objective 'toy_reinforce'"):
        cfg(objective="toy_reinforce", vf_coef=0.1)
    with pytest.raises(ValueError, match="toy_scale does not apply to objective 'grpo'"):
        cfg(objective="grpo", toy_scale=2.0)


def test_toy_estimator_is_one_function(toy_estimator, coin_checkpoint, tmp_path):
    from posttrain.train.data_sources import Batch
    from posttrain.train.objectives import PolicyOutputs
    from posttrain.train.sequences import pack

    c = cfg(objective="grpo", estimator="toy_max_baseline", toy_offset=0.5)
    assert c.estimator_params.toy_offset == 0.5
    # the objective optimises exactly what the function returns: rewards [1, 0, 0, 1] -> r - max + 0.5
    packed = pack([[1, 5]] * 4, [[7, 2], [2], [8, 2], [9, 2]], pad_id=0, group_size=4)
    batch = Batch(packed, 4, [None] * 4, [""] * 4, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    old = PolicyOutputs(torch.zeros(4, packed.target_mask.shape[1]))
    targets, _ = OBJECTIVES["grpo"]().prepare(batch, old, None, c)
    assert targets.advantages.tolist() == [0.5, -0.5, -0.5, 0.5]
    res = train(c, init_dir=coin_checkpoint, ref_dir=coin_checkpoint, out_dir=tmp_path, task=build_task("coin"),
                expert_format=None, seed=0, device="cpu")
    assert res.steps == 2
    with pytest.raises(ValueError, match="toy_offset does not apply"):
        cfg(objective="grpo", toy_offset=0.5)  # the default estimator "grpo" has no such knob
    with pytest.raises(ValueError, match="sequence-level; objective 'ppo' needs a token-level"):
        cfg(objective="ppo", estimator="toy_max_baseline")


def test_toy_diagnostic_reaches_diff_json_and_results_json(toy_diagnostic, tiny_checkpoint, tmp_path):
    from posttrain.models.loading import load_model
    from posttrain.results import assemble_results
    from posttrain.study import Run

    model, tok = load_model(tiny_checkpoint)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "ft", safe_serialization=True)
    res = diff(tiny_checkpoint, {"ft": tmp_path / "ft"}, tmp_path / "d", esd=True, show_progress=False)
    js = json.loads((tmp_path / "d" / "diff.json").read_text())["models"]["ft"]
    table = res.tables["ft"].set_index("name")
    assert table.loc["model.layers.0.self_attn.q_proj.weight", "toy_top_sv_ratio"] == pytest.approx(1.5, rel=1e-6)
    assert table.loc["model.layers.1.self_attn.q_proj.weight", "toy_top_sv_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert js["toy_top_sv_ratio_by_module"]["q_proj"] == pytest.approx(1.25, rel=1e-6)
    study = build_study_config({"methods": {"ft": {"objective": "sft"}}})
    scores = {"acc": 0.5, "malformed": 0.0, "format_share": {}}
    evals = {m: {k: scores for k in ("points24/id", "points24/ood", "facts/id", "strings/id", "arith/id")}
             for m in ("base", "ft")}
    results = assemble_results(study, evals, {"ft": js}, Run(tmp_path / "run"), wall_seconds=0.0)
    assert results["diagnostics"]["ft"]["toy_top_sv_ratio"] == js["toy_top_sv_ratio"]
    assert results["diagnostics"]["ft"]["toy_top_sv_ratio_by_module"]["q_proj"] == pytest.approx(1.25, rel=1e-6)


def test_registries_refuse_clashes():
    with pytest.raises(ValueError, match="registered twice"):
        register_objective("grpo")(type("X", (Objective,), {}))
    with pytest.raises(ValueError, match="registered twice"):
        register_estimator("grpo")(lambda rewards, group_size: rewards)
    with pytest.raises(ValueError, match="already exist"):
        D.register(D.Diagnostic("again", lambda m: {}, columns=("angle_top_left",)))


@pytest.mark.parametrize("knobs,match", [
    ({"objective": "grpo", "vf_coef": 0.5}, "vf_coef does not apply to objective 'grpo'.*knob of objective 'ppo'"),
    ({"objective": "grpo", "rounds": 2}, "rounds does not apply.*data source 'filtered'"),
    ({"objective": "ppo", "adv_norm_std": False}, "adv_norm_std does not apply.*estimator 'grpo'"),
    ({"objective": "sft", "clip_eps_low": 0.1}, "clip_eps_low does not apply to objective 'sft'"),
    ({"objective": "sft", "estimator": "grpo"}, "estimator does not apply to objective 'sft'"),
    ({"objective": "sft", "kl_mode": "reward"}, "kl_mode 'reward' needs an objective that learns from rewards"),
    ({"objective": "grpo", "stpes": 3}, "unknown field 'stpes'"),
    ({"objective": "grpo", "estimator": "nope"}, "unknown advantage estimator 'nope'"),
    ({"objective": "ppo", "gamma": 1.5}, "gamma"),
])
def test_knobs_that_do_not_apply_are_errors(knobs, match):
    with pytest.raises(UserError, match=match) as e:
        build_study_config({"methods": {"m": knobs}})
    assert "\n" not in str(e.value) and "methods.m" in str(e.value)


def test_vf_coef_on_grpo_exits_2_naming_the_knob(tmp_path):
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(ROOT / "configs" / "default.yaml"),
                        "--method", "grpo", "--base", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--set", "methods.grpo.vf_coef=0.5"], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "vf_coef" in lines[0] and "grpo" in lines[0], r.stderr
