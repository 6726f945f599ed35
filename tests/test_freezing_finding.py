"""freezing_reduces_forgetting: frozen SFT variants against plain SFT, on made-up results, and the
shipped configs/freezing.yaml that runs them."""

import math
from pathlib import Path

import pytest

from posttrain.config import StudyConfig, TrainConfig, load_study_config
from posttrain.findings import Context, evaluate_findings
from posttrain.findings.freezing import frozen_sft

ROOT = Path(__file__).resolve().parent.parent
MLP, QK = ["*.mlp.*@1-2"], ["re:\\.(q_proj|k_proj)\\."]


def cfg(first_frozen=False):
    methods = {"sft": TrainConfig(objective="sft"), "grpo": TrainConfig(objective="grpo"),
               "sft_mlp": TrainConfig(objective="sft", freeze=MLP), "sft_qk": TrainConfig(objective="sft", freeze=QK)}
    if first_frozen:  # a frozen variant listed first is still not "the SFT method"
        methods = {"sft_qk": methods.pop("sft_qk"), **methods}
    return StudyConfig(methods=methods)


def run(forgetting, id_acc=None, n=10**9, facts=None):
    id_acc = id_acc or {}
    models = {name: {"id_acc": id_acc.get(name, 0.5), "ood_acc": 0.2, "format_share": {"eq": 1.0},
                     "retention": {"facts": (facts or {}).get(name, 0.8 - forgetting.get(name, 0.0))}}
              for name in ("base", "sft", "grpo", "sft_mlp", "sft_qk")}
    return {"models": models, "forgetting": {k: v for k, v in forgetting.items()}, "diagnostics": {},
            "n_problems": {"id": n, "ood": n, "retention": {"facts": n}}}


def finding(res, c=None):
    return next(f for f in evaluate_findings(res, c or cfg()) if f["id"] == "freezing_reduces_forgetting")


BASE_F = {"sft": 0.2, "grpo": 0.0, "sft_mlp": 0.1, "sft_qk": 0.05}


def test_every_frozen_variant_must_forget_less_the_weakest_decides():
    f = finding(run(BASE_F))
    # reductions 0.1 (mlp) and 0.15 (qk) with (nearly) the same SE: mlp's is the smaller
    assert f["holds"] is True and f["value"] == pytest.approx(0.1)
    assert f["evidence"].startswith("sft_mlp (freeze *.mlp.*@1-2): forgetting +0.100 vs sft +0.200 (reduction +0.100")
    assert "sft_qk (freeze re:\\.(q_proj|k_proj)\\.): forgetting +0.050" in f["evidence"]
    assert "in-domain gain +0.000 vs sft (within noise)" in f["evidence"]
    # one variant forgets more than plain SFT: the claim about every variant fails
    assert finding(run({**BASE_F, "sft_qk": 0.3}))["holds"] is False
    assert finding(run({**BASE_F, "sft_qk": 0.2}))["holds"] is None  # a tie: within noise


def test_the_reduction_is_judged_against_its_binomial_standard_error():
    # 100 problems per probe: the SE of forgetting(sft) - forgetting(variant) is sqrt(p(1-p)/100 + q(1-q)/100)
    f = finding(run({**BASE_F, "sft_mlp": 0.15, "sft_qk": 0.15}, n=100))
    se = math.sqrt(0.6 * 0.4 / 100 + 0.65 * 0.35 / 100)
    assert (f["value"], f["se"], f["holds"]) == (pytest.approx(0.05), pytest.approx(se), None)
    f = finding(run({**BASE_F, "sft_mlp": 0.0, "sft_qk": 0.0}, n=100))  # 0.2 vs 2 SE = 0.13
    assert f["holds"] is True


def test_in_domain_gain_is_reported_with_the_noise_rule():
    f = finding(run(BASE_F, id_acc={"sft": 0.6, "sft_mlp": 0.4, "sft_qk": 0.61}))
    assert "sft_mlp" in f["evidence"] and "in-domain gain -0.200 vs sft (lower)" in f["evidence"]
    assert "in-domain gain +0.010 vs sft (higher)" in f["evidence"]


def test_untestable_without_a_frozen_variant_and_plain_sft_is_never_a_frozen_one():
    plain = StudyConfig(methods={"sft": TrainConfig(objective="sft"), "grpo": TrainConfig(objective="grpo")})
    f = finding(run(BASE_F), plain)
    assert f["holds"] is None and f["evidence"].startswith("this run has no frozen SFT method (run configs/freezing.yaml")
    assert Context(run(BASE_F), cfg(first_frozen=True)).sft == "sft"
    assert frozen_sft(Context(run(BASE_F), cfg(first_frozen=True))) == ["sft_qk", "sft_mlp"]
    only_frozen = StudyConfig(methods={"sft_mlp": TrainConfig(objective="sft", freeze=MLP)})
    f = finding(run(BASE_F), only_frozen)
    assert (f["holds"], f["evidence"]) == (None, "this run has no plain SFT method")


def test_shipped_freezing_config_runs_both_variants_beside_plain_sft():
    c = load_study_config(ROOT / "configs" / "freezing.yaml")
    plain = c.methods["sft"]
    for name, rules in (("sft_frozen_mlp", MLP), ("sft_frozen_qk", QK)):
        m = c.methods[name]
        assert m.freeze == rules and m.is_expert_sft and m.init == "base"
        # the plain SFT's recipe, freezing aside
        assert m.model_dump(exclude={"freeze"}) == plain.model_dump(exclude={"freeze"})
    models = dict.fromkeys(["base", *c.methods], {})
    ctx = Context({"models": models, "forgetting": {}, "diagnostics": {}}, c)
    assert ctx.sft == "sft" and frozen_sft(ctx) == ["sft_frozen_mlp", "sft_frozen_qk"]


def test_a_frozen_variant_must_start_from_the_base():
    # frozen SFT on top of plain SFT's model is no variant of it: its forgetting includes SFT's own
    c = StudyConfig(methods={"sft": TrainConfig(objective="sft"), "grpo": TrainConfig(objective="grpo"),
                             "sft_mlp": TrainConfig(objective="sft", freeze=MLP, init="sft"),
                             "sft_qk": TrainConfig(objective="sft", freeze=QK, init="base")})
    assert frozen_sft(Context(run(BASE_F), c)) == ["sft_qk"]
