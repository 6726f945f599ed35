import pytest

from posttrain.config import build_study_config, load_study_config, preset_path
from posttrain.errors import UserError


def test_presets_load_and_are_complete():
    for name in ("quick", "default"):
        cfg = load_study_config(preset_path(name))
        assert cfg.name == name and {"sft", "grpo"} <= set(cfg.methods)
        # identical step budget, prompt batch and group size for SFT and RL from the base: only the method differs
        budgets = {(m.steps, m.prompts_per_step, m.samples_per_prompt, m.task, m.split, m.schedule)
                   for n, m in cfg.methods.items() if n in ("sft", "grpo")}
        assert len(budgets) == 1
        # the healing experiment: RL from the final SFT model, from its peak-OOD checkpoint, and from an
        # SFT run several times as long (which keeps checkpoints); repairs from the base and the peak
        inits = {m.init for m in cfg.methods.values() if m.is_rl}
        longer = [n for n, m in cfg.methods.items() if m.is_expert_sft and m.steps >= 3 * cfg.methods["sft"].steps
                  and m.checkpoint_every]
        assert {"sft", "sft@peak_ood"} <= inits and len(longer) == 1 and longer[0] in inits
        assert cfg.repair.sources == ["base", "sft_peak_ood"] and "sft" in cfg.checkpoint_eval_methods


def test_override_changes_one_field_keeps_defaults():
    cfg = build_study_config({}, ["world.points24.n_cards=3", "pretrain.steps=7", "methods.sft.lr=0.01"])
    assert cfg.world["points24"] == {"n_cards": 3}
    assert cfg.pretrain.steps == 7 and cfg.methods["sft"].lr == 0.01
    assert cfg.methods["grpo"].objective == "grpo"  # untouched defaults survive


@pytest.mark.parametrize("data,overrides,match", [
    ({"pretrain": {"steps": 0}}, [], "pretrain.steps"),
    ({"model": {"hidden_size": 30, "num_heads": 4}}, [], "divisible"),
    ({"methods": {"x": {"objective": "dpo"}}}, [], "unknown objective"),
    ({"id_task": {"task": "points24", "split": "test"}}, [], "no split"),
    ({"retention": [{"task": "nope"}]}, [], "unknown task"),
    ({"bogus": 1}, [], "bogus"),
    ({}, ["eval.pass_k=[16]"], "pass_k"),
    ({}, ["pretrain.steps"], "key.path=value"),
    ({"methods": {"a": {"init": "b"}, "b": {"init": "a"}}}, [], None),
    ({"world": {"points24": {"n_cards": 12}}}, [], "n_cards"),
])
def test_bad_configs_are_one_line_user_errors(data, overrides, match):
    if match is None:  # cycles are caught when the study orders methods
        from posttrain.study import method_order

        with pytest.raises(UserError, match="cycle"):
            method_order(build_study_config(data, overrides))
        return
    with pytest.raises(UserError, match=match) as e:
        build_study_config(data, overrides)
    assert "\n" not in str(e.value)


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_study_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_study_config(bad)
    with pytest.raises(UserError, match="unknown preset"):
        preset_path("huge")


def test_method_recipes_and_pipeline_order():
    from posttrain.study import method_order

    cfg = build_study_config({"methods": {
        "rl_after": {"method": "grpo", "init": "sft"},
        "sft": {"method": "sft"},
        "ei": {"method": "ei_restart", "rounds": 2},
        "dr": {"method": "dr_grpo"},
    }})
    assert method_order(cfg).index("sft") < method_order(cfg).index("rl_after")
    ei, dr = cfg.methods["ei"], cfg.methods["dr"]
    assert (ei.objective, ei.data_source, ei.rounds, ei.restart_from_base) == ("sft", "filtered", 2, True)
    assert (dr.adv_norm_std, dr.loss_agg) == (False, "seq-mean-token-sum-norm")
    with pytest.raises(UserError, match="unknown method recipe"):
        build_study_config({"methods": {"x": {"method": "dpo"}}})
    with pytest.raises(UserError, match="needs on_policy data"):
        build_study_config({"methods": {"x": {"objective": "grpo", "data": "expert"}}})
