"""rl_easy_to_hard and on_policy_forgets_less on made-up results."""

import math

import pytest

from posttrain.config import StudyConfig, TrainConfig
from posttrain.findings import evaluate_findings
from posttrain.tasks import build_task

BIG = 10**9


def model(id_acc=0.5, ood_acc=0.2, ret=None):
    return {"id_acc": id_acc, "ood_acc": ood_acc, "retention": ret or {"facts": 0.8}, "format_share": {"eq": 1.0}}


def finding(res, cfg, fid):
    return next(f for f in evaluate_findings(res, cfg) if f["id"] == fid)


def test_arith_knows_its_harder_split():
    assert build_task("arith").harder_split("id") == "ood" and build_task("arith").harder_split("ood") is None
    assert build_task("arith", {"n_ops": 3, "n_ops_ood": 2}).harder_split("ood") == "id"
    assert build_task("arith", {"n_ops": 2, "n_ops_ood": 2}).harder_split("id") is None
    assert build_task("points24").harder_split("id") is None


def arith_run(rl_ood, n=BIG, base_ood=0.2):
    return {"models": {"base": model(0.4, base_ood), "grpo": model(0.6, rl_ood)}, "forgetting": {"grpo": 0.0},
            "diagnostics": {}, "n_problems": {"id": n, "ood": n, "retention": {"facts": n}}}


ARITH = StudyConfig(id_task={"task": "arith", "split": "id"}, ood_task={"task": "arith", "split": "ood"},
                    methods={"grpo": TrainConfig(objective="grpo", task="arith", split="id")})


def test_rl_on_the_easy_split_raises_the_hard_split():
    f = finding(arith_run(0.3), ARITH, "rl_easy_to_hard")
    assert (f["holds"], f["value"]) == (True, pytest.approx(0.1))
    assert f["evidence"] == "grpo trained on arith/id: arith/ood (OOD task) accuracy 0.200 -> 0.300 (+0.100)"
    assert finding(arith_run(0.1), ARITH, "rl_easy_to_hard")["holds"] is False
    assert finding(arith_run(0.2), ARITH, "rl_easy_to_hard")["holds"] is None  # no change: within noise
    # 100 problems: +0.05 against 2 SE = 2 sqrt(0.2 * 0.8 / 100 + 0.25 * 0.75 / 100) = 0.118
    f = finding(arith_run(0.25, n=100), ARITH, "rl_easy_to_hard")
    assert f["holds"] is None and f["se"] == pytest.approx(math.sqrt(0.16 / 100 + 0.1875 / 100))


def test_rl_easy_to_hard_reads_a_retention_probe_and_is_untestable_elsewhere():
    cfg = StudyConfig(retention=[{"task": "facts"}, {"task": "arith", "split": "ood"}],
                      methods={"grpo": TrainConfig(objective="grpo", task="arith", split="id")})
    res = {"models": {"base": model(ret={"facts": 0.8, "arith": 0.1}), "grpo": model(ret={"facts": 0.8, "arith": 0.3})},
           "forgetting": {"grpo": 0.0}, "diagnostics": {},
           "n_problems": {"id": BIG, "ood": BIG, "retention": {"facts": BIG, "arith": BIG}}}
    f = finding(res, cfg, "rl_easy_to_hard")
    assert f["holds"] is True and "arith/ood (retention probe) accuracy 0.100 -> 0.300" in f["evidence"]
    # the default study trains RL on points24, which has no harder split
    default = StudyConfig(methods={"grpo": TrainConfig(objective="grpo")})
    f = finding(arith_run(0.3), default, "rl_easy_to_hard")
    assert (f["holds"], f["evidence"]) == (None, "grpo trains on points24/id, which has no harder split")
    unmeasured = StudyConfig(methods={"grpo": TrainConfig(objective="grpo", task="arith", split="id")})
    f = finding(arith_run(0.3), unmeasured, "rl_easy_to_hard")
    assert f["holds"] is None and f["evidence"].endswith("does not evaluate its harder split arith/ood")


SELF = StudyConfig(methods={"sft": TrainConfig(objective="sft"), "grpo": TrainConfig(objective="grpo"),
                            "ei": TrainConfig(objective="sft", data="filtered", rounds=3),
                            "self_sft": TrainConfig(objective="sft", data="filtered", rounds=1)})


def self_run(f_sft=0.2, f_self=0.05, id_sft=0.6, id_self=0.6, n=BIG):
    models = {"base": model(0.3), "sft": model(id_sft), "grpo": model(0.5), "ei": model(0.5), "self_sft": model(id_self)}
    return {"models": models, "forgetting": {"sft": f_sft, "grpo": 0.0, "ei": 0.0, "self_sft": f_self},
            "diagnostics": {}, "n_problems": {"id": n, "ood": n, "retention": {"facts": n}}}


def test_self_sft_forgets_less_at_a_comparable_gain():
    f = finding(self_run(), SELF, "on_policy_forgets_less")
    assert (f["holds"], f["value"]) == (True, pytest.approx(0.15))
    assert f["evidence"] == "forgetting sft +0.200 vs self_sft +0.050; in-domain gain sft +0.300 vs self_sft +0.300"
    assert finding(self_run(f_self=0.3), SELF, "on_policy_forgets_less")["holds"] is False
    assert finding(self_run(f_self=0.2), SELF, "on_policy_forgets_less")["holds"] is None
    # Self-SFT gaining more is comparable; gaining less beyond noise is not (learning less forgets less)
    assert finding(self_run(id_self=0.7), SELF, "on_policy_forgets_less")["holds"] is True
    f = finding(self_run(id_self=0.4), SELF, "on_policy_forgets_less")
    assert f["holds"] is None and f["evidence"].endswith("not comparable: self_sft gained less beyond noise (-0.200 vs "
                                                          "2 SE = 0.000)")
    # on 100 problems 0.55 vs 0.6 is within noise: comparable, and the forgetting decides
    f = finding(self_run(id_self=0.55, n=100, f_self=0.0), SELF, "on_policy_forgets_less")
    # the SE of the forgetting difference: both methods' probe accuracies (0.8 each) on 100 problems
    assert f["holds"] is True and f["se"] == pytest.approx(math.sqrt(2 * 0.8 * 0.2 / 100))


def test_on_policy_forgets_less_untestable_without_self_sft():
    cfg = StudyConfig(methods={"sft": TrainConfig(objective="sft"),
                               "ei": TrainConfig(objective="sft", data="filtered", rounds=3)})
    res = self_run()
    del res["models"]["self_sft"], res["models"]["grpo"]
    f = finding(res, cfg, "on_policy_forgets_less")
    assert (f["holds"], f["evidence"]) == (None, "this run has no Self-SFT method (SFT on filtered self-samples in one "
                                                 "round: method: self_sft)")


def test_harder_accuracy_names_where_the_harder_split_was_measured():
    from posttrain.findings import Context
    from posttrain.findings.transfer import harder_accuracy

    methods = {"grpo": TrainConfig(objective="grpo", task="arith", split="id")}
    res = {"models": {"base": model(ret={"facts": 0.8, "arith": 0.1}), "grpo": model(ret={"facts": 0.8, "arith": 0.3})},
           "forgetting": {"grpo": 0.0}, "diagnostics": {}}
    ood = StudyConfig(ood_task={"task": "arith", "split": "ood"}, methods=methods)
    assert harder_accuracy(Context(res, ood), "arith", "ood") == ("arith/ood (OOD task)", "ood", "")
    probe = StudyConfig(retention=[{"task": "facts"}, {"task": "arith", "split": "ood"}], methods=methods)
    assert harder_accuracy(Context(res, probe), "arith", "ood") == ("arith/ood (retention probe)", "retention", "arith")
    # a configured probe without a measurement in results.json: not measured
    del res["models"]["base"]["retention"]["arith"]
    assert harder_accuracy(Context(res, probe), "arith", "ood") is None


def test_self_sft_starts_from_the_base():
    from posttrain.findings import Context
    from posttrain.findings.transfer import self_sft

    cfg = StudyConfig(methods={"sft": TrainConfig(objective="sft"),
                               "self_on_sft": TrainConfig(objective="sft", data="filtered", rounds=1, init="sft"),
                               "self_sft": TrainConfig(objective="sft", data="filtered", rounds=1)})
    res = self_run()
    res["models"]["self_on_sft"] = model(0.6)
    assert self_sft(Context(res, cfg)) == "self_sft"


def test_the_shipped_easy_to_hard_config_tests_the_claim_on_the_default_base():
    from posttrain.config import load_study_config, preset_path

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_study_config(root / "configs" / "easy_to_hard.yaml")
    f = finding(arith_run(0.3), cfg, "rl_easy_to_hard")
    assert f["holds"] is True and f["evidence"].startswith("grpo trained on arith/id: arith/ood (OOD task)")
    # the default study's model and pretraining, so a demo's bases are reused
    default = load_study_config(preset_path("default"))
    assert (cfg.model, cfg.pretrain) == (default.model, default.pretrain)
