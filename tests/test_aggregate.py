"""Aggregation over seeds (posttrain/aggregate.py) and the single-seed noise rule of the findings."""

import math

import pytest

from posttrain.aggregate import aggregate_results, aggregate_values, spread
from posttrain.config import StudyConfig
from posttrain.findings import evaluate_findings, t975


def test_spread_matches_hand_computation():
    s = spread([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; sd = sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3); t_{0.975,3} = 3.182; half = 3.182 sqrt(5/3) / 2
    assert s["mean"] == pytest.approx(2.5)
    assert s["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert s["ci95"] == pytest.approx([2.5 - 2.053972, 2.5 + 2.053972], abs=1e-5)
    assert s["values"] == [1.0, 2.0, 3.0, 4.0]
    assert t975(3) == 3.182


def test_spread_of_one_value_and_of_missing_values():
    one = spread([0.4])
    assert one == {"mean": 0.4, "sd": None, "ci95": None, "values": [0.4]}
    gap = spread([1.0, None, 3.0])  # a seed without the metric: kept as None, left out of the statistics
    assert gap["mean"] == pytest.approx(2.0) and gap["sd"] == pytest.approx(math.sqrt(2))
    assert gap["ci95"] == pytest.approx([2.0 - 12.706, 2.0 + 12.706])  # t_{0.975,1} sqrt(2) / sqrt(2)
    assert gap["values"] == [1.0, None, 3.0]
    assert spread([None, None]) == {"mean": None, "sd": None, "ci95": None, "values": [None, None]}


def test_aggregate_values_leaf_by_leaf():
    a = {"acc": 0.5, "name": "x", "flag": True, "curve": [1, 2], "ragged": [1], "by": {"q": 0.1}, "only_a": 3,
         "mixed": "s"}
    b = {"acc": 0.7, "name": "x", "flag": False, "curve": [3, 4], "ragged": [1, 2], "by": {"q": 0.3}, "mixed": "t"}
    out = aggregate_values([a, b])
    assert out["acc"]["mean"] == pytest.approx(0.6) and out["acc"]["values"] == [0.5, 0.7]
    assert out["name"] == "x"  # equal non-numeric leaves are kept
    assert out["flag"] == {"values": [True, False]}  # bools are not numbers; differing leaves list the seeds'
    assert out["mixed"] == {"values": ["s", "t"]}
    assert [c["mean"] for c in out["curve"]] == [2, 3]  # lists element by element
    assert out["ragged"] == {"values": [[1], [1, 2]]}
    assert out["by"]["q"]["values"] == [0.1, 0.3]
    assert out["only_a"]["values"] == [3, None] and out["only_a"]["sd"] is None


def _results(seed: int, sft_id: float, grpo_id: float, holds: bool) -> dict:
    models = {"base": {"id_acc": 0.3, "ood_acc": 0.2, "retention": {"facts": 0.8}},
              "sft": {"id_acc": sft_id, "ood_acc": 0.1, "retention": {"facts": 0.6}},
              "grpo": {"id_acc": grpo_id, "ood_acc": 0.2, "retention": {"facts": 0.8}}}
    return {"study": "t", "seed": seed, "wall_seconds": 10.0, "id_task": "points24/id", "ood_task": "points24/ood",
            "retention_tasks": ["facts/id"], "models": models, "forgetting": {"sft": 0.2, "grpo": 0.0},
            "diagnostics": {"sft": {"rel_update_total": 0.1 + seed}}, "repairs": {"r": {"ood_recovered_frac": None}},
            "findings": [{"id": "sft_gains_more_id", "claim": "c", "holds": holds, "evidence": f"e{seed}",
                          "value": sft_id - grpo_id, "threshold": 0.0, "se": 0.01, "held_in": "1/1"},
                         {"id": "plain", "claim": "p", "holds": True, "evidence": "ok", "held_in": "1/1"}]}


def test_aggregate_results_shape_and_findings():
    per_seed = {1: _results(1, 0.5, 0.45, True), 0: _results(0, 0.6, 0.40, True)}
    agg = aggregate_results(per_seed, {0: "seed-0", 1: "seed-1"})
    assert agg["kind"] == "seeds" and agg["seeds"] == [0, 1] and agg["runs"] == {"0": "seed-0", "1": "seed-1"}
    assert agg["wall_seconds"] == 20.0 and agg["id_task"] == "points24/id"
    sft = agg["models"]["sft"]["id_acc"]
    assert sft["values"] == [0.6, 0.5] and sft["mean"] == pytest.approx(0.55)  # seed order, not insertion order
    assert set(sft) >= {"mean", "sd", "ci95", "values"}
    assert agg["forgetting"]["sft"]["sd"] == 0.0 and agg["forgetting"]["sft"]["ci95"] == pytest.approx([0.2, 0.2])
    assert agg["diagnostics"]["sft"]["rel_update_total"]["values"] == [0.1, 1.1]
    assert agg["repairs"]["r"]["ood_recovered_frac"] is None
    f = {x["id"]: x for x in agg["findings"]}
    assert f["sft_gains_more_id"]["held_in"] == "2/2" and f["plain"]["held_in"] == "2/2"
    # margins 0.20 and 0.05: mean 0.125, sd 0.106, t_{0.975,1} 12.706 -> the interval includes 0
    assert f["sft_gains_more_id"]["holds"] is None and "within noise" in f["sft_gains_more_id"]["evidence"]
    assert f["plain"]["holds"] is True


def test_aggregate_results_refuses_different_studies():
    a, b = _results(0, 0.5, 0.4, True), _results(1, 0.5, 0.4, True)
    b["id_task"] = "arith/id"
    with pytest.raises(ValueError, match="id_task"):
        aggregate_results({0: a, 1: b})


def _study_results(sft_id: float, grpo_id: float, n: int | None = 400) -> dict:
    ret = {"facts": 0.8, "strings": 0.7, "arith": 0.6}
    models = {"base": {"id_acc": 0.30, "ood_acc": 0.15, "retention": dict(ret), "format_share": {"eq": 0.6, "steps": 0.4}},
              "sft": {"id_acc": sft_id, "ood_acc": 0.02, "retention": {k: v - 0.2 for k, v in ret.items()},
                      "format_share": {"steps": 1.0}},
              "grpo": {"id_acc": grpo_id, "ood_acc": 0.12, "retention": {k: v - 0.04 for k, v in ret.items()},
                       "format_share": {"eq": 0.9, "steps": 0.1}}}
    return {"models": models, "forgetting": {"sft": 0.2, "grpo": 0.04}, "diagnostics": {}, "repairs": {},
            "n_problems": {"id": n, "ood": n, "retention": {k: n for k in ret}}}


def test_single_seed_difference_within_noise_is_null():
    cfg = StudyConfig()
    # SFT +0.135 vs GRPO +0.125 on 400 problems: the 0.010 margin is far below 2 SE (about 0.07)
    got = {f["id"]: f for f in evaluate_findings(_study_results(0.435, 0.425), cfg)}["sft_gains_more_id"]
    assert got["holds"] is None and "within noise" in got["evidence"] and got["held_in"] == "0/1"
    assert got["value"] == pytest.approx(0.010) and 0.03 < got["se"] < 0.04
    # the same rule decides a difference well beyond it
    big = {f["id"]: f for f in evaluate_findings(_study_results(0.60, 0.40), cfg)}["sft_gains_more_id"]
    assert big["holds"] is True and big["held_in"] == "1/1"
    worse = {f["id"]: f for f in evaluate_findings(_study_results(0.35, 0.55), cfg)}["sft_gains_more_id"]
    assert worse["holds"] is False
