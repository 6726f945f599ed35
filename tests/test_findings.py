"""The study's conclusions: every finding's verdict on made-up results where its claim holds, where
it does not (boundaries and ties included) and where it cannot be tested; and `forgetting`."""

import pytest

from posttrain.config import StudyConfig, TrainConfig
from posttrain.report.findings import (
    curve_ends_vs_middle,
    evaluate_findings,
    mid_layer_mlp,
    pick_methods,
    top_format,
)
from posttrain.results import forgetting, model_entry

CFG = StudyConfig()  # methods: sft (expert SFT) and grpo (RL)


def model(id_acc, ood_acc, top=0.5, base_fmt=None):
    return {"id_acc": id_acc, "ood_acc": ood_acc, "retention": {},
            "format_share": base_fmt or {"eq": top, "steps": 1 - top}}


def diag(mlp_mid=1.0, top_module="q_proj", angle=None, svc=None, curve=None):
    by_mod = {m: 0.1 for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    by_mod[top_module] = 0.5
    d = {"rel_update_by_module": by_mod,
         # 3 layers: the middle third is layer 1
         "rel_update_by_layer_module": {m: [99.0, mlp_mid, 99.0] for m in ("gate_proj", "up_proj", "down_proj")}}
    if angle is not None:
        d["principal_angle_top"], d["sv_rel_change_top"] = angle, svc
    if curve is not None:
        d["angle_curve"] = curve
    return d


def results(**over):
    """A run where every claim holds; `over` replaces parts of it."""
    r = {
        "models": {"base": model(0.3, 0.2, top=0.6), "sft": model(0.6, 0.05), "grpo": model(0.5, 0.25, top=0.95)},
        "forgetting": {"sft": 0.2, "grpo": 0.01},
        "diagnostics": {"sft": diag(6.0, "q_proj", angle=30.0, svc=0.1,
                                    curve={"x": [0.05, 0.5, 0.95], "left": [10.0, 2.0, 12.0], "right": [10.0, 2.0, 12.0]}),
                        "grpo": diag(2.0, "k_proj")},
        "repairs": {
            "uv20": {"method": "uv_merge", "params": {"mode": "direction", "top": 0.2, "bottom": 0.0},
                     "ood_recovered_frac": 0.8, "id_kept_frac": 0.9, "ood_acc": 0.15, "ood_gap": 0.15},
            "reset25": {"method": "reset_layers", "params": {"first_frac": 0.25},
                        "ood_recovered_frac": 0.75, "id_kept_frac": 0.5, "ood_acc": 0.15, "ood_gap": 0.15},
            "dir100": {"method": "uv_merge", "params": {"mode": "direction", "top": 1.0, "bottom": 0.0},
                       "ood_recovered_frac": 0.9, "id_kept_frac": 0.1, "ood_acc": 0.2, "ood_gap": 0.15},
            "mag100": {"method": "uv_merge", "params": {"mode": "magnitude", "top": 1.0, "bottom": 0.0},
                       "ood_recovered_frac": 0.2, "id_kept_frac": 0.8, "ood_acc": 0.08, "ood_gap": 0.15},
        },
    }
    for path, value in over.items():
        node = r
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return r


DELETE = object()
ALL = ["sft_gains_id", "rl_gains_id", "sft_gains_more_id", "sft_forgets_more", "rl_forgets_little",
       "rl_generalizes_ood", "sft_moves_mlp_more", "qk_change_most", "sft_rotates_not_rescales",
       "rotation_at_spectrum_ends", "uv_top20_recovers_ood", "reset_first_quarter_recovers_ood",
       "sft_damage_is_rotation", "rl_format_collapse"]


def verdicts(res, cfg=CFG):
    out = evaluate_findings(res, cfg)
    assert all(f["claim"] and f["evidence"] for f in out)
    return {f["id"]: f["holds"] for f in out}


def test_every_claim_holds_on_the_made_up_run():
    v = verdicts(results())
    assert list(v) == ALL
    # qk_change_most: sft's top module is q_proj but grpo's is k_proj: both count
    assert v == dict.fromkeys(ALL, True)


# (claim, results override, expected verdict); every other claim keeps its verdict of the base case
CASES = [
    # in-domain gains: strictly positive
    ("sft_gains_id", {"models__sft__id_acc": 0.3}, False),
    ("sft_gains_id", {"models__sft__id_acc": 0.2}, False),
    ("rl_gains_id", {"models__grpo__id_acc": 0.3}, False),
    ("rl_gains_id", {"models__grpo__id_acc": 0.31}, True),
    # SFT gains more than RL: a tie is not "more"
    ("sft_gains_more_id", {"models__sft__id_acc": 0.5}, False),
    ("sft_gains_more_id", {"models__sft__id_acc": 0.45}, False),
    # forgetting: SFT more than RL, ties are not more
    ("sft_forgets_more", {"forgetting__sft": 0.01}, False),
    ("sft_forgets_more", {"forgetting__sft": -0.1}, False),
    ("sft_forgets_more", {"forgetting__grpo": 0.3}, False),
    # RL forgets little: strictly below 0.05; negative forgetting (improved retention) is little
    ("rl_forgets_little", {"forgetting__grpo": 0.05}, False),
    ("rl_forgets_little", {"forgetting__grpo": 0.0499}, True),
    ("rl_forgets_little", {"forgetting__grpo": 0.2, "forgetting__sft": 0.3}, False),
    ("rl_forgets_little", {"forgetting__grpo": -0.2}, True),
    # OOD: RL's change larger than SFT's (changes relative to the base, so a loss counts negative)
    ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.05}, False),
    ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.04}, False),
    ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.06}, True),
    ("rl_generalizes_ood", {"models__sft__ood_acc": 0.3}, False),
    # mid-layer MLP ratio strictly above 1.5; 1.5 exactly is not
    ("sft_moves_mlp_more", {"diagnostics__sft__rel_update_by_layer_module": {"up_proj": [0.0, 3.0, 0.0]}}, False),
    ("sft_moves_mlp_more", {"diagnostics__sft__rel_update_by_layer_module": {"up_proj": [0.0, 3.02, 0.0]}}, True),
    # a ratio, not a product: 1.0 / 0.5 = 2 holds, 0.5 / 0.25 = 2 as well, 0.7 / 0.5 = 1.4 does not
    ("sft_moves_mlp_more", {"diagnostics__sft__rel_update_by_layer_module": {"up_proj": [0.0, 1.0, 0.0]},
                            "diagnostics__grpo__rel_update_by_layer_module": {"up_proj": [0.0, 0.5, 0.0]}}, True),
    ("sft_moves_mlp_more", {"diagnostics__sft__rel_update_by_layer_module": {"up_proj": [0.0, 0.5, 0.0]},
                            "diagnostics__grpo__rel_update_by_layer_module": {"up_proj": [0.0, 0.25, 0.0]}}, True),
    ("sft_moves_mlp_more", {"diagnostics__sft__rel_update_by_layer_module": {"up_proj": [0.0, 3.5, 0.0]},
                            "diagnostics__grpo__rel_update_by_layer_module": {"up_proj": [0.0, 2.5, 0.0]}}, False),
    ("sft_moves_mlp_more", {"diagnostics__grpo__rel_update_by_layer_module": {"up_proj": [0.0, 0.0, 0.0]}}, None),
    ("sft_moves_mlp_more", {"diagnostics__grpo__rel_update_by_layer_module": DELETE}, None),
    ("sft_moves_mlp_more", {"diagnostics__sft": {}}, None),
    # q/k must be the top linear module of every method
    ("qk_change_most", {"diagnostics__grpo__rel_update_by_module__v_proj": 0.9}, False),
    ("qk_change_most", {"diagnostics__sft__rel_update_by_module__down_proj": 0.6}, False),
    # a non-linear module (embeddings) does not compete
    ("qk_change_most", {"diagnostics__sft__rel_update_by_module__embed": 5.0}, True),
    # a method that never moved has no top module and is left out; none left: untestable
    ("qk_change_most", {"diagnostics__grpo__rel_update_by_module": dict.fromkeys(("v_proj", "q_proj"), 0.0)}, True),
    ("qk_change_most", {"diagnostics__grpo__rel_update_by_module": dict.fromkeys(("v_proj", "q_proj"), 0.0),
                        "diagnostics__sft__rel_update_by_module": dict.fromkeys(("v_proj", "q_proj"), 0.0)}, None),
    ("qk_change_most", {"diagnostics": {}}, None),
    # rotation vs rescaling: angle in radians against the relative s.v. change
    ("sft_rotates_not_rescales", {"diagnostics__sft__sv_rel_change_top": 0.6}, False),
    ("sft_rotates_not_rescales", {"diagnostics__sft__sv_rel_change_top": 0.52}, True),   # 30 deg = 0.5236 rad
    ("sft_rotates_not_rescales", {"diagnostics__sft__principal_angle_top": 0.0,
                                  "diagnostics__sft__sv_rel_change_top": 0.0}, False),
    ("sft_rotates_not_rescales", {"diagnostics__sft__principal_angle_top": DELETE}, None),
    ("sft_rotates_not_rescales", {"diagnostics__sft__sv_rel_change_top": DELETE}, None),
    # both ends above the middle
    ("rotation_at_spectrum_ends", {"diagnostics__sft__angle_curve": {"x": [0.05, 0.5, 0.95], "left": [10.0, 2.0, 1.0],
                                                                    "right": [10.0, 2.0, 1.0]}}, False),
    ("rotation_at_spectrum_ends", {"diagnostics__sft__angle_curve": {"x": [0.05, 0.5, 0.95], "left": [1.0, 2.0, 10.0],
                                                                    "right": [1.0, 2.0, 10.0]}}, False),
    ("rotation_at_spectrum_ends", {"diagnostics__sft__angle_curve": {"x": [0.05, 0.5, 0.95], "left": [2.0, 2.0, 2.0],
                                                                    "right": [2.0, 2.0, 2.0]}}, False),
    ("rotation_at_spectrum_ends", {"diagnostics__sft__angle_curve": {"x": [0.05, 0.5, 0.95], "left": [2.0, 2.0, 9.0],
                                                                    "right": [2.0, 2.0, 9.0]}}, False),  # top ties
    ("rotation_at_spectrum_ends", {"diagnostics__sft__angle_curve": {"x": [0.05, 0.5, 0.95], "left": [9.0, 2.0, 2.0],
                                                                    "right": [9.0, 2.0, 2.0]}}, False),  # bottom ties
    ("rotation_at_spectrum_ends", {"diagnostics__sft__angle_curve": DELETE}, None),
    # the RL method's diagnostics are missing: the SFT claims stand on SFT's numbers
    ("sft_rotates_not_rescales", {"diagnostics__grpo": DELETE}, True),
    ("rotation_at_spectrum_ends", {"diagnostics__sft__angle_curve": {"x": [0.5], "left": [1.0], "right": [1.0]}}, None),
    # the recovery claims: >= 70%, exactly 0.7 holds
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": 0.7}, True),
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": 0.69}, False),
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": None}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20": DELETE}, None),
    ("uv_top20_recovers_ood", {"repairs": DELETE}, None),  # a results.json without a sweep
    ("sft_damage_is_rotation", {"repairs": DELETE}, None),
    # only the direction-only top-20% repair with no bottom part is that claim's repair
    ("uv_top20_recovers_ood", {"repairs__uv20__params": {"mode": "full", "top": 0.2, "bottom": 0.0}}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__params": {"mode": "direction", "top": 0.2, "bottom": 0.1}}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__params": {"mode": "direction", "top": 0.3, "bottom": 0.0}}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__method": "reset_layers"}, None),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__ood_recovered_frac": 0.7}, True),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__ood_recovered_frac": 0.1}, False),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__params": {"first_frac": 0.5}}, None),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__ood_recovered_frac": None}, None),
    # rotation repair beats value repair; a tie does not
    ("sft_damage_is_rotation", {"repairs__mag100__ood_recovered_frac": 0.9}, False),
    ("sft_damage_is_rotation", {"repairs__mag100__ood_recovered_frac": 0.95}, False),
    ("sft_damage_is_rotation", {"repairs__mag100": DELETE}, None),
    # only the top = 1.0 repairs compare: a better magnitude repair at top 0.2 is not that claim's
    ("sft_damage_is_rotation", {"repairs": {
        "mag20": {"method": "uv_merge", "params": {"mode": "magnitude", "top": 0.2, "bottom": 0.0},
                  "ood_recovered_frac": 0.95, "ood_acc": 0.2, "ood_gap": 0.15},
        "dir20": {"method": "uv_merge", "params": {"mode": "direction", "top": 0.2, "bottom": 0.0},
                  "ood_recovered_frac": 0.1, "ood_acc": 0.2, "ood_gap": 0.15},
        **results()["repairs"]}}, True),
    ("sft_damage_is_rotation", {"repairs__dir100": DELETE}, None),
    ("sft_damage_is_rotation", {"repairs__dir100__ood_recovered_frac": None}, None),
    ("sft_damage_is_rotation", {"repairs__mag100__ood_recovered_frac": None}, None),
    # format collapse: RL's top share >= 0.9 and above the base's
    ("rl_format_collapse", {"models__grpo__format_share": {"eq": 0.9, "steps": 0.1}}, True),
    ("rl_format_collapse", {"models__grpo__format_share": {"eq": 0.89, "steps": 0.11}}, False),
    ("rl_format_collapse", {"models__base__format_share": {"eq": 0.95, "steps": 0.05}}, False),
    ("rl_format_collapse", {"models__base__format_share": {"eq": 0.96, "steps": 0.04}}, False),
    # the top format is any format but "malformed"; here steps collapses
    ("rl_format_collapse", {"models__grpo__format_share": {"eq": 0.02, "steps": 0.93, "malformed": 0.05}}, True),
    ("rl_format_collapse", {"models__grpo__format_share": {"eq": 0.05, "steps": 0.03, "malformed": 0.92}}, False),
    ("rl_format_collapse", {"models__grpo__format_share": {"malformed": 1.0}}, False),
]


@pytest.mark.parametrize("cid,over,expect", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_claim_flips_on_its_own_numbers(cid, over, expect):
    assert verdicts(results(**over))[cid] is expect


def test_gain_claims_by_hand():
    v = verdicts(results(**{"models__sft__id_acc": 0.3, "models__grpo__id_acc": 0.25}))
    # no gain (0) is not a gain; RL lost 0.05; SFT's 0 > RL's -0.05
    assert (v["sft_gains_id"], v["rl_gains_id"], v["sft_gains_more_id"]) == (False, False, True)
    v = verdicts(results(**{"models__sft__id_acc": 0.4, "models__grpo__id_acc": 0.6}))
    assert (v["sft_gains_id"], v["rl_gains_id"], v["sft_gains_more_id"]) == (True, True, False)


def test_claims_without_an_sft_or_rl_method_cannot_be_tested():
    no_rl = StudyConfig(methods={"sft": TrainConfig(objective="sft")})
    res = results()
    del res["models"]["grpo"]
    v = verdicts(res, no_rl)
    for cid in ("rl_gains_id", "sft_gains_more_id", "sft_forgets_more", "rl_forgets_little", "rl_generalizes_ood",
                "sft_moves_mlp_more", "rl_format_collapse"):
        assert v[cid] is None, cid
    assert v["sft_gains_id"] is True and v["qk_change_most"] is True
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, no_rl)}
    assert ev["rl_gains_id"] == "this run has no RL method"
    no_sft = StudyConfig(methods={"grpo": TrainConfig(objective="grpo")})
    res = results()
    del res["models"]["sft"]
    v = verdicts(res, no_sft)
    for cid in ("sft_gains_id", "sft_gains_more_id", "sft_forgets_more", "rl_forgets_little", "sft_moves_mlp_more",
                "sft_rotates_not_rescales", "rotation_at_spectrum_ends"):
        assert v[cid] is None, cid
    assert v["rl_gains_id"] is True and v["rl_format_collapse"] is True
    # qk_change_most looks at grpo alone: its top module is k_proj
    assert v["qk_change_most"] is True
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, no_sft)}
    assert ev["sft_gains_id"] == "this run has no SFT method"
    neither = StudyConfig(methods={"ei": TrainConfig(objective="sft", data="filtered")})
    res = results()
    del res["models"]["sft"], res["models"]["grpo"]
    ev = {f["id"]: f for f in evaluate_findings(res, neither)}
    assert ev["sft_forgets_more"]["holds"] is None
    assert ev["sft_forgets_more"]["evidence"] == "this run has no SFT method and no RL method"
    assert ev["qk_change_most"]["holds"] is None


def test_evidence_states_the_numbers():
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(results(), CFG)}
    assert ev["sft_gains_id"] == "sft: id_acc 0.300 -> 0.600 (+0.300)"
    assert ev["sft_forgets_more"] == "forgetting sft +0.200 vs grpo +0.010"
    assert ev["rl_forgets_little"] == "forgetting grpo +0.010"
    assert ev["sft_moves_mlp_more"].endswith("(ratio 3.00)")
    assert ev["uv_top20_recovers_ood"].startswith("uv20: OOD 0.150 (gap to recover +0.150), recovered 80%")


def test_pick_methods_takes_the_first_expert_sft_and_the_first_rl_method():
    cfg = StudyConfig(methods={"ei": TrainConfig(objective="sft", data="filtered"), "ppo": TrainConfig(objective="ppo"),
                               "sft2": TrainConfig(objective="sft"), "grpo": TrainConfig(objective="grpo"),
                               "sft": TrainConfig(objective="sft")})
    done = {"base": {}, "ei": {}, "ppo": {}, "sft2": {}, "grpo": {}, "sft": {}}
    assert pick_methods(cfg, {"models": done}) == ("sft2", "ppo")
    # methods without results (not run) are skipped
    del done["sft2"], done["ppo"]
    assert pick_methods(cfg, {"models": done}) == ("sft", "grpo")
    assert pick_methods(cfg, {"models": {"base": {}, "ei": {}}}) == (None, None)
    rloo = StudyConfig(methods={"r": TrainConfig(objective="rloo")})
    assert pick_methods(rloo, {"models": {"r": {}}}) == (None, "r")


@pytest.mark.parametrize("n,layers", [(1, [0]), (2, [0, 1]), (3, [1]), (4, [1, 2]), (6, [2, 3]), (9, [3, 4, 5]),
                                      (10, [3, 4, 5, 6])])
def test_mid_layer_mlp_uses_the_middle_third(n, layers):
    # value 1 + layer index in the MLP cells, a huge value in the attention cells
    cells = {m: [float(i + 1) for i in range(n)] for m in ("gate_proj", "up_proj", "down_proj")}
    cells["q_proj"] = [1e6] * n
    expect = (sum((i + 1) ** 2 for i in layers) / len(layers)) ** 0.5
    assert mid_layer_mlp({"rel_update_by_layer_module": cells}) == pytest.approx(expect)


def test_mid_layer_mlp_root_mean_square_and_missing_cells():
    cells = {"gate_proj": [0.0, 3.0, 0.0], "down_proj": [0.0, 4.0, 0.0], "up_proj": [0.0, None, 0.0]}
    assert mid_layer_mlp({"rel_update_by_layer_module": cells}) == pytest.approx((12.5) ** 0.5)
    assert mid_layer_mlp({}) is None
    assert mid_layer_mlp({"rel_update_by_layer_module": {"up_proj": [1.0, None, 1.0]}}) is None


def test_top_format_ignores_malformed():
    assert top_format({"eq": 0.2, "steps": 0.3, "malformed": 0.5}) == ("steps", 0.3)
    assert top_format({"malformed": 1.0}) == (None, 0.0)
    assert top_format({}) == (None, 0.0)


def test_curve_ends_vs_middle_boundaries():
    # x <= 0.1 is the top, x >= 0.9 the bottom, 0.25 <= x <= 0.75 the middle; both sides pooled
    curve = {"x": [0.1, 0.2, 0.25, 0.75, 0.8, 0.9], "left": [1.0, 100.0, 2.0, 4.0, 100.0, 5.0],
             "right": [3.0, 100.0, None, 6.0, 100.0, 7.0]}
    assert curve_ends_vs_middle(curve) == pytest.approx((2.0, 6.0, 4.0))
    assert curve_ends_vs_middle({"x": [0.0, 0.5], "left": [1.0, 2.0]}) is None
    assert curve_ends_vs_middle({}) is None


# ---- forgetting and the per-model record ---------------------------------------------------------

def test_forgetting_is_the_mean_retention_drop():
    base = {"retention": {"facts": 0.8, "strings": 0.6, "arith": 0.5}}
    ft = {"retention": {"facts": 0.5, "strings": 0.7, "arith": 0.5, "extra": 0.0}}
    # drops 0.3, -0.1, 0: forgot on average 0.2 / 3; the model's extra probe is not the base's
    assert forgetting(base, ft) == pytest.approx(0.2 / 3)
    assert forgetting(ft | {"retention": base["retention"]}, base) == 0.0
    # improving retention is negative forgetting
    assert forgetting(ft | {"retention": {"facts": 0.5}}, {"retention": {"facts": 0.9}}) == pytest.approx(-0.4)
    assert forgetting({"retention": {}}, {"retention": {}}) == 0.0


def test_model_entry_reads_the_scores_of_each_split():
    cfg = StudyConfig(retention=[{"task": "facts"}, {"task": "strings", "split": "id"}, {"task": "strings", "split": "ood"}])

    def s(acc, **kw):
        return {"acc": acc, "malformed": acc / 10, "format_share": {"eq": acc}, **kw}

    scores = {"points24/id": s(0.5, sampled_acc=0.4, pass_at_k={"1": 0.4}), "points24/ood": s(0.2),
              "facts/id": s(0.9), "strings/id": s(0.7), "strings/ood": s(0.3)}
    e = model_entry(cfg, scores)
    assert (e["id_acc"], e["ood_acc"], e["id_malformed"], e["ood_malformed"]) == (0.5, 0.2, 0.05, 0.02)
    # a task with one retention split is named by the task, one with several by task/split
    assert e["retention"] == {"facts": 0.9, "strings/id": 0.7, "strings/ood": 0.3}
    assert e["format_share"] == {"eq": 0.5} and e["id_sampled_acc"] == 0.4 and e["ood_sampled_acc"] is None
    assert e["id_pass_at_k"] == {"1": 0.4} and e["ood_pass_at_k"] == {}
    scores["points24/id"], scores["points24/ood"] = s(0.5), s(0.2, sampled_acc=0.1, pass_at_k={"4": 0.3})
    e = model_entry(cfg, scores)
    assert (e["id_sampled_acc"], e["ood_sampled_acc"], e["id_pass_at_k"], e["ood_pass_at_k"]) == (None, 0.1, {}, {"4": 0.3})


def test_assemble_results_computes_forgetting_for_every_method(tmp_path):
    from posttrain.results import assemble_results

    class Run:
        def method(self, name):
            return tmp_path / name

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "train.json").write_text('{"steps": 3}')

    def s(acc):
        return {"acc": acc, "malformed": 0.0, "format_share": {"eq": 1.0}}

    evals = {n: {"points24/id": s(a), "points24/ood": s(a), "facts/id": s(f), "strings/id": s(st), "arith/id": s(ar)}
             for n, a, f, st, ar in (("base", 0.3, 0.9, 0.8, 0.7), ("sft", 0.6, 0.6, 0.8, 0.4), ("grpo", 0.5, 0.9, 0.9, 0.7))}
    cfg = StudyConfig(seed=7, name="s1")
    res = assemble_results(cfg, evals, {"sft": {"rel_update_total": 0.1, "per_tensor": [1]}}, Run(), 12.3456)
    assert res["forgetting"] == pytest.approx({"sft": (0.3 + 0.0 + 0.3) / 3, "grpo": -0.1 / 3})
    assert res["diagnostics"] == {"sft": {"rel_update_total": 0.1}}
    assert res["training"] == {"sft": {"steps": 3}, "grpo": {}}
    assert res["wall_seconds"] == 12.35 and res["retention_tasks"] == ["facts/id", "strings/id", "arith/id"]
    assert (res["id_task"], res["ood_task"]) == ("points24/id", "points24/ood")
    assert res["diagnostic_pairs"] == {} and res["trajectories"] == {}
    assert (res["study"], res["seed"], res["repairs"], res["findings"]) == ("s1", 7, {}, [])
    assert set(res["models"]) == {"base", "sft", "grpo"} and res["models"]["sft"]["retention"] == \
        {"facts": 0.6, "strings": 0.8, "arith": 0.4}
    extra = {"pairs": {"a|b": 1}, "trajectory": {"sft": [2]}}
    res = assemble_results(CFG, evals, {}, Run(), 1.0, diag_extra=extra)
    assert res["diagnostic_pairs"] == {"a|b": 1} and res["trajectories"] == {"sft": [2]}


# The report shows each claim and its evidence as written here: a changed threshold or rule in
# the text must come with a deliberate change of this table.
CLAIMS = {
    "sft_gains_id": "SFT raises in-domain accuracy over the base.",
    "rl_gains_id": "RL raises in-domain accuracy over the base.",
    "sft_gains_more_id": "SFT on expert data gains more in-domain than RL.",
    "sft_forgets_more": "SFT forgets more than RL (larger mean drop on retention probes).",
    "rl_forgets_little": "RL forgets little: mean retention drop below 0.05.",
    "rl_generalizes_ood": "RL generalises better out of domain than SFT (larger OOD change).",
    "sft_moves_mlp_more": "SFT moves mid-layer MLP weights more than RL (relative update ratio > 1.5).",
    "qk_change_most": "Attention query/key weights change most (top linear module is q_proj or k_proj, for every method).",
    "sft_rotates_not_rescales": "SFT mostly rotates singular vectors rather than rescaling singular values (mean top-k "
                                "principal angle, in radians, exceeds the mean top-k relative singular-value change).",
    "rotation_at_spectrum_ends": "The rotation concentrates at the top and bottom of the spectrum (SFT's principal angle "
                                 "in both the top and the bottom 10% of the spectrum exceeds its mean over the middle 50%).",
    "uv_top20_recovers_ood": "Restoring the base's top-20% singular directions recovers >= 70% of SFT's lost OOD accuracy.",
    "reset_first_quarter_recovers_ood": "Resetting the first 25% of layers to the base recovers >= 70% of SFT's lost OOD "
                                        "accuracy.",
    "sft_damage_is_rotation": "SFT's damage is a rotation of singular vectors, not a change of singular values: restoring "
                              "all base directions recovers more OOD accuracy than restoring all base singular values.",
    "rl_format_collapse": "RL collapses outputs onto one format (top format share >= 0.9 and above the base's).",
}


def test_claims_and_evidence_text():
    res = results(**{"diagnostics__grpo__principal_angle_top": 9.0, "diagnostics__grpo__sv_rel_change_top": 0.25,
                     "repairs__uv20__id_kept_frac": None})
    out = evaluate_findings(res, CFG)
    assert {f["id"]: f["claim"] for f in out} == CLAIMS
    assert {f["id"]: f["evidence"] for f in out} == {
        "sft_gains_id": "sft: id_acc 0.300 -> 0.600 (+0.300)",
        "rl_gains_id": "grpo: id_acc 0.300 -> 0.500 (+0.200)",
        "sft_gains_more_id": "id gain sft +0.300 vs grpo +0.200",
        "sft_forgets_more": "forgetting sft +0.200 vs grpo +0.010",
        "rl_forgets_little": "forgetting grpo +0.010",
        "rl_generalizes_ood": "ood change sft -0.150 vs grpo +0.050 (base ood 0.200)",
        "sft_moves_mlp_more": "mid-layer MLP rel. update sft 6.00e+00 vs grpo 2.00e+00 (ratio 3.00)",
        "qk_change_most": "sft: top q_proj 5.00e-01, k_proj 1.00e-01, v_proj 1.00e-01; "
                          "grpo: top k_proj 5.00e-01, q_proj 1.00e-01, v_proj 1.00e-01",
        "sft_rotates_not_rescales": "sft: top-k angle 30.00 deg = 0.524 rad vs top-k s.v. change 0.100 "
                                    "(grpo: 0.157 rad vs 0.250)",
        "rotation_at_spectrum_ends": "sft: mean angle top 10% 10.00 deg, bottom 10% 12.00, middle 50% 2.00",
        "uv_top20_recovers_ood": "uv20: OOD 0.150 (gap to recover +0.150), recovered 80%, in-domain gain kept n/a",
        "reset_first_quarter_recovers_ood": "reset25: OOD 0.150 (gap to recover +0.150), recovered 75%, "
                                            "in-domain gain kept 50%",
        "sft_damage_is_rotation": "directions restored: 90% recovered; singular values restored: 20% recovered",
        "rl_format_collapse": "sampled format shares: base top eq 0.60; grpo top eq 0.95",
    }


def test_untestable_evidence_text():
    neither = StudyConfig(methods={"ei": TrainConfig(objective="sft", data="filtered")})
    res = results(repairs={}, diagnostics={})
    del res["models"]["sft"], res["models"]["grpo"]
    out = evaluate_findings(res, neither)
    assert {f["id"]: f["claim"] for f in out} == CLAIMS
    both = "this run has no SFT method and no RL method"
    assert {f["id"]: (f["holds"], f["evidence"]) for f in out} == {
        **{cid: (None, both) for cid in ("sft_gains_id", "rl_gains_id", "sft_gains_more_id", "sft_forgets_more",
                                          "rl_forgets_little", "rl_generalizes_ood", "sft_moves_mlp_more",
                                          "rl_format_collapse")},
        "qk_change_most": (None, "no diagnostics"),
        "sft_rotates_not_rescales": (None, "this run has no SFT method"),
        "rotation_at_spectrum_ends": (None, "this run has no SFT method"),
        "uv_top20_recovers_ood": (None, "no such repair in this run's sweep"),
        "reset_first_quarter_recovers_ood": (None, "no such repair in this run's sweep"),
        "sft_damage_is_rotation": (None, "needs uv_merge direction and magnitude repairs at top=1.0"),
    }
    # an SFT method without spectral diagnostics or a curve, an RL method without layer cells
    res = results(**{"diagnostics__sft__principal_angle_top": DELETE, "diagnostics__sft__angle_curve": DELETE,
                     "diagnostics__grpo__rel_update_by_layer_module": DELETE})
    out = evaluate_findings(res, CFG)
    assert {f["id"]: f["claim"] for f in out} == CLAIMS
    ev = {f["id"]: f["evidence"] for f in out}
    assert ev["sft_rotates_not_rescales"] == "no spectral diagnostics (diagnostics.spectral: false)"
    assert ev["rotation_at_spectrum_ends"] == "no principal-angle curve"
    assert ev["sft_moves_mlp_more"] == "no per-layer MLP diagnostics"
    res = results(**{"diagnostics__grpo__principal_angle_top": 9.0})  # an RL angle without its s.v. change
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["sft_rotates_not_rescales"].endswith("change 0.100 (grpo: 0.157 rad vs nan)")
    res = results(**{"diagnostics__grpo": DELETE})
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["sft_rotates_not_rescales"] == "sft: top-k angle 30.00 deg = 0.524 rad vs top-k s.v. change 0.100"
    res = results(**{"repairs__uv20__ood_recovered_frac": None})
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["uv_top20_recovers_ood"] == "uv20: OOD 0.150 (gap to recover +0.150), recovered n/a, in-domain gain kept 90%"
