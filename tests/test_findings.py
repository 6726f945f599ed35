"""The study's conclusions: every finding's verdict on made-up results where its claim holds, where
it does not (boundaries and ties included), where it is within noise and where it cannot be tested;
the noise rule itself (one seed against 2 binomial SE, several seeds by a paired t-interval); and
`forgetting`."""

import math

import pytest

from posttrain.config import StudyConfig, TrainConfig
from posttrain.findings import (
    FINDINGS,
    Context,
    Measured,
    aggregate_findings,
    binomial_se,
    combine_se,
    decide,
    evaluate_findings,
    paired_interval,
    t975,
)
from posttrain.findings.formats import top_format
from posttrain.findings.spectra import curve_ends_vs_middle
from posttrain.findings.weights import mid_layer_mlp
from posttrain.results import forgetting, model_entry, problem_counts

CFG = StudyConfig()  # methods: sft (expert SFT) and grpo (RL)
# problems behind each accuracy of the made-up run: so many that a margin of 1e-4 is far beyond
# 2 binomial standard errors (~3e-5), so the comparisons below decide on their numbers alone
BIG = 10**9
SE_F, SE_GAP = 0.004, 0.001  # SEs of the made-up recovered fractions and of the OOD gap they divide by


def model(id_acc, ood_acc, top=0.5, base_fmt=None, facts=0.9):
    return {"id_acc": id_acc, "ood_acc": ood_acc, "retention": {"facts": facts},
            "format_share": base_fmt or {"eq": top, "steps": 1 - top}}


ANGLE = 30.0  # degrees: 0.5236 rad
NULL_RATIOS = (1.0, 2.0, 3.0, 1.0, 2.0, 3.0)  # rotation-to-rescaling ratios of the random draws: mean 2, SD sqrt(0.8)


def null_diag(ratios=NULL_RATIOS, angle=ANGLE):
    """The random-update null of a method's diagnostics, its draws at `angle` degrees with these ratios."""
    svcs = [math.radians(angle) / r for r in ratios]
    d = {f"null_principal_angle_top_d{i}": angle for i in range(len(ratios))}
    d.update({f"null_sv_rel_change_top_d{i}": v for i, v in enumerate(svcs)})
    d.update(null_principal_angle_top=angle, null_sv_rel_change_top=sum(svcs) / len(svcs))
    return d


def energy(mid, attn=1.0, mlp=1.0, scale=1.0):
    """||dW||_F^2 cells of 3 layers: `attn` in each attention matrix, `mlp` in the outer layers' MLP
    matrices, `mid` in the middle layer's; all times `scale`."""
    cells = {m: [attn * scale] * 3 for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    cells.update({m: [mlp * scale, mid * scale, mlp * scale] for m in ("gate_proj", "up_proj", "down_proj")})
    return cells


def diag(mlp_mid=1.0, top_module="q_proj", angle=None, svc=None, curve=None):
    by_mod = {m: 0.1 for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    by_mod[top_module] = 0.5
    d = {"rel_update_by_module": by_mod,
         # 3 layers: the middle third is layer 1
         "rel_update_by_layer_module": {m: [99.0, mlp_mid, 99.0] for m in ("gate_proj", "up_proj", "down_proj")},
         "update_sq_by_layer_module": energy(mlp_mid)}
    if angle is not None:
        d["principal_angle_top"], d["sv_rel_change_top"] = angle, svc
        # every matrix has a null here: the null's set is the whole model
        d["null_set_principal_angle_top"], d["null_set_sv_rel_change_top"] = angle, svc
        d.update(null_diag())
    if curve is not None:
        d["angle_curve"] = curve
    return d


def series(eq_shares, samples=BIG, start=1):
    """A method's format shares over its sampling steps: eq at each given share, steps the rest."""
    return [{"step": start + i, "samples": samples, "shares": {"eq": p, "steps": 1 - p}} for i, p in enumerate(eq_shares)]


def results(**over):
    """A run where every claim holds; `over` replaces parts of it."""
    r = {
        "models": {"base": model(0.3, 0.2, top=0.6, facts=0.9), "sft": model(0.6, 0.05, facts=0.7),
                   "grpo": model(0.5, 0.25, top=0.95, facts=0.89)},
        "n_problems": {"id": BIG, "ood": BIG, "retention": {"facts": BIG}},
        "forgetting": {"sft": 0.2, "grpo": 0.01},
        # the formats grpo sampled over 10 training steps: the base's top format eq rises 0.6 -> 0.95
        "format_trajectories": {"grpo": series([0.6] * 5 + [0.9] * 4 + [0.95])},
        "diagnostics": {"sft": diag(6.0, "q_proj", angle=30.0, svc=0.1,
                                    curve={"x": [0.05, 0.5, 0.95], "left": [10.0, 2.0, 12.0], "right": [10.0, 2.0, 12.0]}),
                        "grpo": diag(2.0, "k_proj")},
        # the sweep: the published operators (UV-merge without re-orthonormalisation, reset in the
        # reference's scope) decide; their variants are shown beside them. Recovered fractions carry a
        # small delta-method SE (2 SE = 0.008), the gap its binomial SE
        "repairs": {
            "uv20": {"method": "uv_merge", "params": {"mode": "direction", "top": 0.2, "bottom": 0.0, "orthonormalize": False},
                     "ood_recovered_frac": 0.8, "ood_recovered_se": SE_F, "id_kept_frac": 0.9, "ood_acc": 0.15,
                     "ood_gap": 0.15, "ood_gap_se": SE_GAP},
            "uvqr20": {"method": "uv_merge", "params": {"mode": "direction", "top": 0.2, "bottom": 0.0, "orthonormalize": True},
                       "ood_recovered_frac": 0.5, "ood_recovered_se": SE_F, "id_kept_frac": 0.9, "ood_acc": 0.125,
                       "ood_gap": 0.15, "ood_gap_se": SE_GAP},
            "reset25": {"method": "reset_layers", "params": {"first_frac": 0.25, "scope": "reference"},
                        "ood_recovered_frac": 0.75, "ood_recovered_se": SE_F, "id_kept_frac": 0.5, "ood_acc": 0.15,
                        "ood_gap": 0.15, "ood_gap_se": SE_GAP},
            "reset25l": {"method": "reset_layers", "params": {"first_frac": 0.25, "scope": "layers"},
                         "ood_recovered_frac": 0.6, "ood_recovered_se": SE_F, "id_kept_frac": 0.5, "ood_acc": 0.14,
                         "ood_gap": 0.15, "ood_gap_se": SE_GAP},
            "dir100": {"method": "uv_merge", "params": {"mode": "direction", "top": 1.0, "bottom": 0.0, "orthonormalize": True},
                       "ood_recovered_frac": 0.9, "ood_recovered_se": SE_F, "id_kept_frac": 0.1, "ood_acc": 0.2,
                       "ood_gap": 0.15, "ood_gap_se": SE_GAP},
            "mag100": {"method": "uv_merge", "params": {"mode": "magnitude", "top": 1.0, "bottom": 0.0},
                       "ood_recovered_frac": 0.2, "ood_recovered_se": SE_F, "id_kept_frac": 0.8, "ood_acc": 0.08,
                       "ood_gap": 0.15, "ood_gap_se": SE_GAP},
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
# claims the made-up run cannot test: too few models for the KL rule, no RL started from SFT, no frozen SFT
UNTESTED = ["kl_predicts_forgetting", "rl_heals_sft_ood", "stronger_sft_heals_better", "rl_undoes_sft_rotation",
            "freezing_reduces_forgetting", "rl_easy_to_hard", "on_policy_forgets_less"]


def verdicts(res, cfg=CFG):
    out = evaluate_findings(res, cfg)
    assert all(f["claim"] and f["evidence"] for f in out)
    return {f["id"]: f["holds"] for f in out}


def test_every_claim_holds_on_the_made_up_run():
    v = verdicts(results())
    assert list(v) == ALL + UNTESTED
    # qk_change_most: sft's top module is q_proj but grpo's is k_proj: both count
    assert v == {**dict.fromkeys(ALL, True), **dict.fromkeys(UNTESTED)}


# (claim, results override, expected verdict); every other claim keeps its verdict of the base case.
# The accuracy comparisons follow the noise rule: a tie (margin exactly 0) is within noise (None)
# whatever the number of problems, where the rule before the noise rule called it False; a margin
# of 1e-4 or more decides (BIG problems: 2 SE ~ 3e-5).
CASES = [
    # in-domain gains: strictly positive
    ("sft_gains_id", {"models__sft__id_acc": 0.3}, None),  # tie: within noise
    ("sft_gains_id", {"models__sft__id_acc": 0.2}, False),
    ("sft_gains_id", {"models__sft__id_acc": 0.2999}, False),
    ("sft_gains_id", {"models__sft__id_acc": 0.3001}, True),
    ("rl_gains_id", {"models__grpo__id_acc": 0.3}, None),  # tie: within noise
    ("rl_gains_id", {"models__grpo__id_acc": 0.31}, True),
    ("rl_gains_id", {"models__grpo__id_acc": 0.2999}, False),
    # SFT gains more than RL: a tie is not "more" (within noise)
    ("sft_gains_more_id", {"models__sft__id_acc": 0.5}, None),
    ("sft_gains_more_id", {"models__sft__id_acc": 0.45}, False),
    ("sft_gains_more_id", {"models__sft__id_acc": 0.5001}, True),
    # forgetting: SFT more than RL, ties are not more (within noise)
    ("sft_forgets_more", {"forgetting__sft": 0.01}, None),
    ("sft_forgets_more", {"forgetting__sft": -0.1}, False),
    ("sft_forgets_more", {"forgetting__grpo": 0.3}, False),
    ("sft_forgets_more", {"forgetting__sft": 0.0101}, True),
    # RL forgets little: strictly below 0.05 (0.05 itself: within noise); negative forgetting
    # (improved retention) is little
    ("rl_forgets_little", {"forgetting__grpo": 0.05}, None),
    ("rl_forgets_little", {"forgetting__grpo": 0.0501}, False),
    ("rl_forgets_little", {"forgetting__grpo": 0.0499}, True),
    ("rl_forgets_little", {"forgetting__grpo": 0.2, "forgetting__sft": 0.3}, False),
    ("rl_forgets_little", {"forgetting__grpo": -0.2}, True),
    # OOD: RL's change larger than SFT's (changes relative to the base, so a loss counts negative)
    ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.05}, None),  # tie: within noise
    ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.04}, False),
    ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.06}, True),
    ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.0501}, True),
    ("rl_generalizes_ood", {"models__sft__ood_acc": 0.3}, False),
    # mid-layer MLP share of the update energy: sft 18 / 36 = 0.5, grpo 6 / 24 = 0.25 (ratio 2); the
    # ratio of shares must be strictly above 1.5
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": energy(4.0)}, False),  # 12/30 = 0.4: 1.25
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": energy(3.0)}, False),  # 9/27: exactly 1.5
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": energy(2.99)}, True),
    # learning-rate invariant: RL's whole update 6x larger (36x the energy) or 6x smaller decides the same
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": energy(2.0, scale=36.0)}, True),
    ("sft_moves_mlp_more", {"diagnostics__sft__update_sq_by_layer_module": energy(6.0, scale=1 / 36)}, True),
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": energy(4.0, scale=1 / 36)}, False),
    # a larger relative update of SFT's mid-layer MLPs alone does not decide it: the share does
    ("sft_moves_mlp_more", {"diagnostics__sft__rel_update_by_layer_module": {"up_proj": [0.0, 300.0, 0.0]},
                            "diagnostics__sft__update_sq_by_layer_module": energy(2.0, scale=1000.0)}, False),
    # every energy in the mid-layer MLPs: share 1
    ("sft_moves_mlp_more", {"diagnostics__sft__update_sq_by_layer_module": energy(5.0, attn=0.0, mlp=0.0)}, True),
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": energy(0.0, attn=0.0, mlp=0.0)}, None),
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": energy(0.0)}, None),  # share 0
    ("sft_moves_mlp_more", {"diagnostics__grpo__update_sq_by_layer_module": DELETE}, None),
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
    # rotation vs rescaling against the random updates' ratios (mean 2, SD 0.894, 2 SD = 1.789): SFT's
    # ratio 0.5236 rad / 0.1 = 5.24 holds. Before the null, 0.52 rad vs a change of 0.5 held (ratio
    # 1.05): a random update does more than that
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_set_sv_rel_change_top": 0.5}, None),
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_set_sv_rel_change_top": math.radians(30) / 2}, None),  # = null
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_set_sv_rel_change_top": math.radians(30) / 3.7}, None),  # +1.7
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_set_sv_rel_change_top": math.radians(30) / 3.9}, True),  # +1.9
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_set_sv_rel_change_top": math.radians(30) / 0.2}, False),  # -1.8
    # draws that agree exactly have no spread: the plain comparison with their ratio
    ("sft_rotates_not_rescales", {"diagnostics__sft": {**diag(6.0, angle=30.0, svc=math.radians(30) / 2.01),
                                                       **null_diag((2.0,) * 6)}}, True),
    ("sft_rotates_not_rescales", {"diagnostics__sft": {**diag(6.0, angle=30.0, svc=math.radians(30) / 1.99),
                                                       **null_diag((2.0,) * 6)}}, False),
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_set_principal_angle_top": 0.0,
                                  "diagnostics__sft__null_set_sv_rel_change_top": 0.0}, None),  # no ratio
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_sv_rel_change_top_d3": DELETE}, None),
    ("sft_rotates_not_rescales", {"diagnostics__sft__principal_angle_top": DELETE}, None),
    # the ratio compared with the null's is over the null's matrices, not the whole model's
    ("sft_rotates_not_rescales", {"diagnostics__sft__sv_rel_change_top": math.radians(30) / 0.2}, True),
    ("sft_rotates_not_rescales", {"diagnostics__sft__principal_angle_top": 1.0,
                                  "diagnostics__sft__null_set_sv_rel_change_top": math.radians(30) / 0.2}, False),
    ("sft_rotates_not_rescales", {"diagnostics__sft__null_set_sv_rel_change_top": DELETE}, None),
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
    # the recovery claims: ">= 70%" is decided as a comparison with 0.7 under the noise rule, so
    # exactly 0.7 is within noise (it held before the noise rule); 2 SE = 0.008 here
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": 0.7}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": 0.71}, True),
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": 0.69}, False),
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": 0.75, "repairs__uv20__ood_recovered_se": 0.03}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": 0.75, "repairs__uv20__ood_recovered_se": 0.02}, True),
    ("uv_top20_recovers_ood", {"repairs__uv20__ood_recovered_frac": None}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20": DELETE}, None),
    ("uv_top20_recovers_ood", {"repairs": DELETE}, None),  # a results.json without a sweep
    ("sft_damage_is_rotation", {"repairs": DELETE}, None),
    # only the published direction-only top-20% repair with no bottom part is that claim's repair;
    # its QR variant alone (uvqr20, recovering 50%) does not stand in for it
    ("uv_top20_recovers_ood", {"repairs__uv20__params": {"mode": "full", "top": 0.2, "bottom": 0.0, "orthonormalize": False}},
     None),
    ("uv_top20_recovers_ood", {"repairs__uv20__params": {"mode": "direction", "top": 0.2, "bottom": 0.1,
                                                         "orthonormalize": False}}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__params": {"mode": "direction", "top": 0.3, "bottom": 0.0,
                                                         "orthonormalize": False}}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__params__orthonormalize": True}, None),
    ("uv_top20_recovers_ood", {"repairs__uv20__method": "reset_layers"}, None),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__ood_recovered_frac": 0.7}, None),  # within noise
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__ood_recovered_frac": 0.71}, True),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__ood_recovered_frac": 0.1}, False),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__params": {"first_frac": 0.5, "scope": "reference"}}, None),
    # the whole-layer reset (reset25l, 60%) is not the reference's operator
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__params__scope": "layers"}, None),
    ("reset_first_quarter_recovers_ood", {"repairs__reset25__ood_recovered_frac": None}, None),
    # rotation repair beats value repair; a tie is within noise (it was False before the noise rule)
    ("sft_damage_is_rotation", {"repairs__mag100__ood_recovered_frac": 0.9}, None),
    ("sft_damage_is_rotation", {"repairs__mag100__ood_recovered_frac": 0.95}, False),
    ("sft_damage_is_rotation", {"repairs__mag100__ood_recovered_frac": 0.88}, True),  # +0.02 vs 2 SE = 0.0094
    ("sft_damage_is_rotation", {"repairs__mag100": DELETE}, None),
    # the direction side is the re-orthonormalised operator (the published one returns the base at top 1.0)
    ("sft_damage_is_rotation", {"repairs__dir100__params__orthonormalize": False}, None),
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
    # format collapse: the base's top format (eq, 0.6) rises from the first 10% of RL's sampling steps
    # to the last 10% (10 steps: one step each, 0.6 -> 0.95)
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.6] * 10)}, None),  # no rise: within noise
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.6] * 9 + [0.5999])}, False),
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.6] * 9 + [0.6001])}, True),
    # a high final share that was already there at the start is no collapse
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.95] * 10)}, None),
    # the windows: 20 steps, the first and the last two; the middle does not count
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.5, 0.7] + [0.0] * 16 + [0.6, 0.6])}, None),
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.5, 0.7] + [1.0] * 16 + [0.55, 0.6])}, False),
    # the dominant format is the base's: steps (0.7 in the base) fell from 0.4 to 0.05 while eq rose
    ("rl_format_collapse", {"models__base__format_share": {"eq": 0.3, "steps": 0.7}}, False),
    # malformed is not a format
    ("rl_format_collapse", {"models__base__format_share": {"eq": 0.2, "steps": 0.1, "malformed": 0.7}}, True),
    ("rl_format_collapse", {"models__base__format_share": {"malformed": 1.0}}, None),
    # on few samples the same rise of 0.05 is within noise (64 samples per step: 2 SE = 0.17)
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.6] * 9 + [0.65], samples=64)}, None),
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.6] * 9 + [0.95], samples=64)}, True),
    # one sampling point (an Expert Iteration with one round) or none: untestable
    ("rl_format_collapse", {"format_trajectories__grpo": series([0.6])}, None),
    ("rl_format_collapse", {"format_trajectories": {}}, None),
]


@pytest.mark.parametrize("cid,over,expect", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_claim_flips_on_its_own_numbers(cid, over, expect):
    assert verdicts(results(**over))[cid] is expect


def test_gain_claims_by_hand():
    v = verdicts(results(**{"models__sft__id_acc": 0.3, "models__grpo__id_acc": 0.25}))
    # no gain (0) is not a gain: within noise under the noise rule; RL lost 0.05; SFT's 0 > RL's -0.05
    assert (v["sft_gains_id"], v["rl_gains_id"], v["sft_gains_more_id"]) == (None, False, True)
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
    assert ev["sft_moves_mlp_more"].endswith("(ratio 2.00)")
    assert ev["uv_top20_recovers_ood"].startswith("uv20: OOD 0.150 (gap to recover +0.150), recovered 80% ± 0% (SE)")


def pick_methods(cfg, results):
    """The roles of the study's methods (`Context.sft`, `Context.rl`), from the methods' traits."""
    ctx = Context({"forgetting": {}, "diagnostics": {}, **results}, cfg)
    return ctx.sft, ctx.rl


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
    assert pick_methods(rloo, {"models": {"base": {}, "r": {}}}) == (None, "r")


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
    (tmp_path / "grpo").mkdir()  # on-policy format shares per step, read for format_trajectories
    (tmp_path / "grpo" / "metrics.jsonl").write_text('{"step": 1, "rollout/reward": 0.5, "rollout/format/eq": 0.25, "rollout/format/steps": 0.75, '
                                                     '"rollout/samples": 8}\n')

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
    from posttrain.analysis.format_shares import read_format_series

    assert res["format_trajectories"] == {"grpo": read_format_series(tmp_path / "grpo" / "metrics.jsonl")}
    assert res["format_trajectories"]["grpo"]
    assert res["n_problems"] == {"id": None, "ood": None, "retention": {"facts": None, "strings": None, "arith": None}}
    for key in ("checkpoint_evals", "peak_ood", "init_from", "repair_sources"):
        assert res[key] == {}, key
    assert set(res["models"]) == {"base", "sft", "grpo"} and res["models"]["sft"]["retention"] == \
        {"facts": 0.6, "strings": 0.8, "arith": 0.4}
    extra = {"pairs": {"a|b": 1}, "trajectory": {"sft": [2]}}
    res = assemble_results(CFG, evals, {}, Run(), 1.0, diag_extra=extra)
    assert res["diagnostic_pairs"] == {"a|b": 1} and res["trajectories"] == {"sft": [2]}


# The report shows each claim and its evidence as written here: a changed threshold or rule in
# the text must come with a deliberate change of this table. The claims that compare accuracies
# end with the noise rule.
FRACTION = ("recovered fraction = (ood(repaired) - ood(SFT)) / (ood(reference) - ood(SFT)), compared with 0.7 using "
            "its delta-method standard error; not testable unless SFT lost OOD accuracy by more than twice the gap's "
            "binomial standard error")
NOISE = ("Noise rule: one seed, the margin must exceed twice its binomial standard error on the fixed problem sets; "
         "several seeds, a 95% paired interval over seeds must exclude it; otherwise within noise.")
CLAIMS = {
    "sft_gains_id": "SFT raises in-domain accuracy over the base. " + NOISE,
    "rl_gains_id": "RL raises in-domain accuracy over the base. " + NOISE,
    "sft_gains_more_id": "SFT on expert data gains more in-domain than RL. " + NOISE,
    "sft_forgets_more": "SFT forgets more than RL (larger mean drop on retention probes). " + NOISE,
    "rl_forgets_little": "RL forgets little: mean retention drop below 0.05. " + NOISE,
    "rl_generalizes_ood": "RL generalises better out of domain than SFT (larger OOD change). " + NOISE,
    "sft_moves_mlp_more": "SFT moves mid-layer MLP weights more than RL, independently of the learning rate (rule: the "
                          "share of each method's update energy, sum of ||dW||_F^2, that falls in the MLP matrices of "
                          "the middle third of the layers, out of all the layers' linear matrices; SFT's share over "
                          "RL's share > 1.5).",
    "qk_change_most": "Attention query/key weights change most (rule: per linear module type, the relative update "
                      "||dW||_F / ||W_base||_F of its matrices over all layers taken together, sqrt(sum ||dW||_F^2) / "
                      "sqrt(sum ||W_base||_F^2), as in Scalpel vs Hammer, so that a module's weight scale does not "
                      "decide; the top module is q_proj or k_proj, for the SFT and the RL method).",
    "sft_rotates_not_rescales": "SFT mostly rotates singular vectors rather than rescaling singular values, beyond what "
                                "a random update does (rule: SFT's rotation-to-rescaling ratio, mean top-k principal "
                                "angle in radians over mean top-k relative singular-value change, must exceed the mean "
                                "ratio of norm-matched random updates of the same matrices (per matrix the same "
                                "||dW||_F as SFT's, i.i.d. Gaussian direction, seeded by the study seed; 6 draws; both ratios over "
                                "the matrices that have a null, every matrix decomposed by an SVD) by more than twice the draws' standard deviation; several seeds: a 95% paired interval "
                                "over seeds of the margin must exclude 0; otherwise within noise).",
    "rotation_at_spectrum_ends": "The rotation concentrates at the top and bottom of the spectrum (SFT's principal angle "
                                 "in both the top and the bottom 10% of the spectrum exceeds its mean over the middle 50%).",
    "uv_top20_recovers_ood": "Restoring the base's top-20% singular directions recovers >= 70% of SFT's lost OOD accuracy "
                             "(rule: UV-merge in direction mode at top 20% with the published operator, no "
                             "re-orthonormalisation; " + FRACTION + "; the QR variant's number is shown beside it). " + NOISE,
    "reset_first_quarter_recovers_ood": "Resetting the first 25% of layers to the base recovers >= 70% of SFT's lost OOD "
                                        "accuracy (rule: reset in the reference's scope, the layers' matrices + token "
                                        "embeddings + LM head, norms kept; " + FRACTION + "; the whole-layer reset's "
                                        "number is shown beside it). " + NOISE,
    "sft_damage_is_rotation": "SFT's damage is a rotation of singular vectors, not a change of singular values: restoring "
                              "all base directions recovers more OOD accuracy than restoring all base singular values "
                              "(rule: UV-merge at top 100% in direction mode, U_b diag(s_t) V_b^T, against magnitude "
                              "mode, U_t diag(s_b) V_t^T; the published operator's shortcut at full rank returns the "
                              "base matrix itself, singular values included, so the direction side is the "
                              "re-orthonormalised operator, which equals the published formula without that shortcut; "
                              "the difference of the recovered fractions must exceed twice its delta-method SE). " + NOISE,
    "rl_format_collapse": "RL and Expert Iteration collapse their outputs onto the dominant pretraining format (rule: "
                          "the base's most-sampled format, malformed excluded; for every RL and Expert Iteration "
                          "method trained from the base, its share among the completions the method sampled during "
                          "training, in the last 10% of its sampling steps (rounds, for Expert Iteration) minus in "
                          "the first 10%; one seed: the method whose rise is smallest in units of its binomial "
                          "standard error decides, its rise must exceed twice that SE; several seeds: a 95% paired "
                          "interval over seeds must exclude 0; otherwise within noise; a method with a single "
                          "sampling round cannot be tested).",
    "freezing_reduces_forgetting": "Freezing part of the model during SFT reduces forgetting (rule: every SFT-on-"
                                   "expert-data method trained from the base with freezing rules, e.g. mid-layer "
                                   "MLPs or Q/K frozen, against plain SFT: forgetting(plain) - "
                                   "forgetting(frozen); the variant whose reduction is smallest in units of its "
                                   "standard error decides, it must exceed twice that SE (one seed; several "
                                   "seeds: a 95% paired interval over seeds must exclude 0; otherwise within "
                                   "noise); the in-domain gain of each variant against plain SFT is reported "
                                   "beside it with the same noise rule; untestable without a frozen SFT method, "
                                   "as in the default study: configs/freezing.yaml has them).",
    "rl_easy_to_hard": "RL on a task's easier split raises accuracy on its harder split (rule: the RL method "
                       "trains on a split whose task has a harder split, e.g. arith with 2 operations against 3, "
                       "and the study evaluates that harder split as its OOD task or a retention probe; its "
                       "accuracy there minus the base's must exceed twice its binomial standard error; several "
                       "seeds: a 95% paired interval over seeds must exclude 0; otherwise within noise; "
                       "untestable when the study trains RL on no such split).",
    "on_policy_forgets_less": "SFT on the model's own verified samples (Self-SFT) forgets less than SFT on expert"
                              " data at a comparable in-domain gain (rule: the first Self-SFT method, filtered "
                              "self-samples in one round from the base, against the plain expert SFT method: "
                              "forgetting(SFT) - forgetting(Self-SFT) must exceed twice its binomial standard "
                              "error; several seeds: a 95% paired interval over seeds must exclude 0; otherwise "
                              "within noise; untestable when Self-SFT gained less in-domain than SFT beyond twice"
                              " the SE of the difference, as learning less is then a cheaper way to forget less, "
                              "or when the study has no Self-SFT).",
}


def test_claims_and_evidence_text():
    res = results(**{"diagnostics__grpo__null_set_principal_angle_top": 9.0, "diagnostics__grpo__null_set_sv_rel_change_top": 0.25,
                     "repairs__uv20__id_kept_frac": None})
    out = evaluate_findings(res, CFG)
    assert {f["id"]: f["claim"] for f in out if f["id"] in CLAIMS} == CLAIMS
    assert {f["id"]: f["evidence"] for f in out if f["id"] in CLAIMS} == {
        "sft_gains_id": "sft: id_acc 0.300 -> 0.600 (+0.300)",
        "rl_gains_id": "grpo: id_acc 0.300 -> 0.500 (+0.200)",
        "sft_gains_more_id": "id gain sft +0.300 vs grpo +0.200",
        "sft_forgets_more": "forgetting sft +0.200 vs grpo +0.010",
        "rl_forgets_little": "forgetting grpo +0.010",
        "rl_generalizes_ood": "ood change sft -0.150 vs grpo +0.050 (base ood 0.200)",
        "sft_moves_mlp_more": "mid-layer MLP share of the update energy sft 0.500 vs grpo 0.250 (ratio 2.00)",
        "qk_change_most": "sft: top q_proj 5.00e-01, k_proj 1.00e-01, v_proj 1.00e-01; "
                          "grpo: top k_proj 5.00e-01, q_proj 1.00e-01, v_proj 1.00e-01",
        "sft_rotates_not_rescales": "sft: top-k angle 30.00 deg vs s.v. change 1.00e-01 (ratio 5.24); random updates "
                                    "of the same norm: 30.00 deg vs 3.20e-01 (ratio 2 ± 0.89 SD over 6 draws) (grpo: "
                                    "top-k angle 9.00 deg vs s.v. change 2.50e-01 (ratio 0.628))",
        "rotation_at_spectrum_ends": "sft: mean angle top 10% 10.00 deg, bottom 10% 12.00, middle 50% 2.00",
        "uv_top20_recovers_ood": "uv20: OOD 0.150 (gap to recover +0.150), recovered 80% ± 0% (SE), in-domain gain kept "
                                 "n/a; QR variant (uvqr20): recovered 50%",
        "reset_first_quarter_recovers_ood": "reset25: OOD 0.150 (gap to recover +0.150), recovered 75% ± 0% (SE), "
                                            "in-domain gain kept 50%; whole layers, norms included (reset25l): recovered 60%",
        "sft_damage_is_rotation": "directions restored (dir100): 90% recovered; singular values restored (mag100): 20% "
                                  "recovered",
        "rl_format_collapse": "share of the base's top format eq (base 0.60) in the samples of training; grpo: 0.60 -> "
                              "0.95 (+0.35, steps 1-1 vs 10-10)",
        "freezing_reduces_forgetting": "this run has no frozen SFT method (run configs/freezing.yaml: SFT with "
                                       "mid-layer MLPs frozen and with Q/K frozen beside plain SFT)",
        "rl_easy_to_hard": "grpo trains on points24/id, which has no harder split",
        "on_policy_forgets_less": "this run has no Self-SFT method (SFT on filtered self-samples in one round: "
                                  "method: self_sft)",
    }


def test_untestable_evidence_text():
    neither = StudyConfig(methods={"ei": TrainConfig(objective="sft", data="filtered")})
    res = results(repairs={}, diagnostics={})
    del res["models"]["sft"], res["models"]["grpo"]
    out = evaluate_findings(res, neither)
    assert {f["id"]: f["claim"] for f in out if f["id"] in CLAIMS} == CLAIMS
    both = "this run has no SFT method and no RL method"
    assert {f["id"]: (f["holds"], f["evidence"]) for f in out if f["id"] in CLAIMS} == {
        **{cid: (None, both) for cid in ("sft_gains_id", "rl_gains_id", "sft_gains_more_id", "sft_forgets_more",
                                          "rl_forgets_little", "rl_generalizes_ood", "sft_moves_mlp_more")},
        "rl_format_collapse": (None, "this run has no RL or Expert Iteration method trained from the base"),
        "qk_change_most": (None, "no diagnostics"),
        "sft_rotates_not_rescales": (None, "this run has no SFT method"),
        "rotation_at_spectrum_ends": (None, "this run has no SFT method"),
        "uv_top20_recovers_ood": (None, "no uv_merge repair with mode=direction, top=0.2, bottom=0.0, orthonormalize=False "
                                        "in this run's sweep"),
        "reset_first_quarter_recovers_ood": (None, "no reset_layers repair with first_frac=0.25, scope=reference in this "
                                                   "run's sweep"),
        "sft_damage_is_rotation": (None, "needs uv_merge direction (orthonormalize: true) and magnitude repairs at top=1.0"),
        "freezing_reduces_forgetting": (None, "this run has no plain SFT method"),
        "rl_easy_to_hard": (None, "this run has no RL method"),
        "on_policy_forgets_less": (None, "this run has no Self-SFT method (SFT on filtered self-samples in one round: "
                                         "method: self_sft)"),
    }
    # an SFT method without spectral diagnostics or a curve, an RL method without layer cells
    res = results(**{"diagnostics__sft__principal_angle_top": DELETE, "diagnostics__sft__angle_curve": DELETE,
                     "diagnostics__grpo__update_sq_by_layer_module": DELETE})
    out = evaluate_findings(res, CFG)
    assert {f["id"]: f["claim"] for f in out if f["id"] in CLAIMS} == CLAIMS
    ev = {f["id"]: f["evidence"] for f in out}
    assert ev["sft_rotates_not_rescales"] == "no spectral diagnostics (diagnostics.spectral: false)"
    assert ev["rotation_at_spectrum_ends"] == "no principal-angle curve"
    assert ev["sft_moves_mlp_more"] == "no per-layer update energy of the linear matrices (update_sq_by_layer_module)"
    sft_ev = ("sft: top-k angle 30.00 deg vs s.v. change 1.00e-01 (ratio 5.24); random updates of the same norm: "
              "30.00 deg vs 3.20e-01 (ratio 2 ± 0.89 SD over 6 draws)")
    res = results(**{"diagnostics__grpo__null_set_principal_angle_top": 9.0})  # an RL angle without its s.v. change
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["sft_rotates_not_rescales"] == sft_ev
    res = results(**{"diagnostics__grpo": DELETE})
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["sft_rotates_not_rescales"] == sft_ev
    # some matrices went through the Gram route (no null there): the evidence says over which the ratios are
    res = results(**{"diagnostics__sft__null_set_matrices": 20, "diagnostics__sft__angle_matrices": 26})
    f = by_id(res)["sft_rotates_not_rescales"]
    assert f["holds"] is True and f["evidence"].startswith(
        "sft: top-k angle 30.00 deg vs s.v. change 1.00e-01 (ratio 5.24) on the 20 of 26 matrices that have a null "
        "(those analysed through their Gram matrix have none); random updates of the same norm: ")
    res = results(**{"diagnostics__sft__null_set_matrices": 26, "diagnostics__sft__angle_matrices": 26})
    assert by_id(res)["sft_rotates_not_rescales"]["evidence"] == sft_ev
    def rotates(**over) -> tuple:
        f = by_id(results(**over))["sft_rotates_not_rescales"]
        return f["holds"], f["evidence"]

    # no matrix had an SVD, so none has a null: untestable, and rerunning would not help
    gram_only = {f"diagnostics__sft__null_principal_angle_top_d{i}": None for i in range(6)}
    assert rotates(**gram_only, **{"diagnostics__sft__null_set_matrices": 0, "diagnostics__sft__angle_matrices": 26}) \
        == (None, "sft: none of its 26 matrices has a random-update null (every one was analysed through its Gram "
                  "matrix; the null needs an SVD)")
    # diagnostics written before the null's own set: untestable, saying why
    assert rotates(**{"diagnostics__sft__null_set_principal_angle_top": DELETE}) == (
        None, "sft: no angle and s.v. change of its own on the null's matrices (diagnostics written before they "
              "were; rerun the diagnostics stage)")
    assert rotates(**{"diagnostics__sft__null_set_sv_rel_change_top": 0.0}) == (
        None, "sft: no rotation-to-rescaling ratio on the null's matrices (s.v. change 0.0)")
    # diagnostics written before the null: untestable, saying why
    assert rotates(**{"diagnostics__sft__null_principal_angle_top_d0": DELETE}) == (
        None, "sft: no random-update null in the diagnostics (rerun the diagnostics stage)")
    # no recovered fraction: SFT did not lose OOD accuracy, or lost it within noise; without a QR variant
    res = results(**{"repairs__uv20__ood_recovered_frac": None, "repairs__uv20__ood_recovered_se": None,
                     "repairs__uv20__ood_gap": -0.02, "repairs__uvqr20": DELETE})
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["uv_top20_recovers_ood"] == ("cannot test: SFT did not lose OOD accuracy (gap to recover -0.020, 2 SE = 0.002); "
                                           "uv20: OOD 0.150 (gap to recover -0.020), recovered n/a, in-domain gain kept 90%")
    res = results(**{"repairs__reset25__ood_recovered_frac": None, "repairs__reset25__ood_recovered_se": None,
                     "repairs__reset25__ood_gap": 0.015, "repairs__reset25__ood_gap_se": 0.01,
                     "repairs__reset25l__ood_recovered_frac": None})
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["reset_first_quarter_recovers_ood"] == (
        "cannot test: the lost OOD accuracy is within noise (gap to recover +0.015, 2 SE = 0.020); reset25: OOD 0.150 "
        "(gap to recover +0.015), recovered n/a, in-domain gain kept 50%; whole layers, norms included (reset25l): "
        "recovered n/a")
    res = results(**{"repairs__dir100__ood_recovered_frac": None, "repairs__dir100__ood_gap": -0.01,
                     "repairs__dir100__ood_gap_se": None})
    ev = {f["id"]: f["evidence"] for f in evaluate_findings(res, CFG)}
    assert ev["sft_damage_is_rotation"] == ("cannot test: SFT did not lose OOD accuracy (gap to recover -0.010); directions "
                                            "restored (dir100): n/a recovered; singular values restored (mag100): 20% "
                                            "recovered")
    # a recovered fraction within noise says so
    res = results(**{"repairs__uv20__ood_recovered_se": 0.06})
    f = by_id(res)["uv_top20_recovers_ood"]
    assert f["holds"] is None and f["evidence"] == (
        "uv20: OOD 0.150 (gap to recover +0.150), recovered 80% ± 6% (SE), in-domain gain kept 90%; QR variant (uvqr20): "
        "recovered 50%; within noise: margin +0.100 vs 2 SE = 0.120")


# ---- the noise rule --------------------------------------------------------------------------------

def by_id(res, cfg=CFG):
    return {f["id"]: f for f in evaluate_findings(res, cfg)}


def test_comparisons_report_value_threshold_and_standard_error():
    out = by_id(results())
    se = lambda p: math.sqrt(p * (1 - p) / BIG)  # noqa: E731
    expect = {  # (value, threshold, se) by hand from the made-up run
        "sft_gains_id": (0.3, 0.0, math.hypot(se(0.6), se(0.3))),
        "rl_gains_id": (0.2, 0.0, math.hypot(se(0.5), se(0.3))),
        # the base's accuracy is in both gains: it cancels, only the two methods' errors remain
        "sft_gains_more_id": (0.1, 0.0, math.hypot(se(0.6), se(0.5))),
        # one retention probe: forgetting(a) - forgetting(b) has the errors of a's and b's probe accuracies
        "sft_forgets_more": (0.19, 0.0, math.hypot(se(0.7), se(0.89))),
        # forgetting of grpo against the base: the base's and grpo's probe accuracies
        "rl_forgets_little": (-0.01, -0.05, math.hypot(se(0.9), se(0.89))),
        "rl_generalizes_ood": (0.2, 0.0, math.hypot(se(0.05), se(0.25))),
    }
    for fid, (value, threshold, s) in expect.items():
        f = out[fid]
        assert (f["value"], f["threshold"], f["se"]) == (pytest.approx(value), threshold, pytest.approx(s, rel=1e-9)), fid
        assert FINDINGS[fid].noisy, fid
    # a weight-space ratio has no sampling noise of its own: no standard error, a plain comparison
    mlp = out["sft_moves_mlp_more"]
    assert (mlp["value"], mlp["threshold"], mlp["se"], mlp["holds"]) == (pytest.approx(2.0), 1.5, None, True)
    assert not FINDINGS["sft_moves_mlp_more"].noisy
    # the recovery claims compare the sweep's recovered fraction with 0.7, with the sweep's delta-method SE
    for fid, value in (("uv_top20_recovers_ood", 0.8), ("reset_first_quarter_recovers_ood", 0.75)):
        f = out[fid]
        assert (f["value"], f["threshold"], f["se"], f["holds"]) == (value, 0.7, SE_F, True) and FINDINGS[fid].noisy, fid
    # direction vs magnitude at top 1.0: the difference of two fractions of one gap g = 0.15, SE
    # sqrt(se_R_dir^2 + se_R_mag^2 + diff^2 se_g^2) / g with the repaired accuracies' binomial SEs
    rot = out["sft_damage_is_rotation"]
    want = math.sqrt(0.2 * 0.8 / BIG + 0.08 * 0.92 / BIG + 0.7**2 * SE_GAP**2) / 0.15
    assert (rot["value"], rot["threshold"], rot["se"]) == (pytest.approx(0.7), 0.0, pytest.approx(want, rel=1e-9))
    assert FINDINGS["sft_damage_is_rotation"].noisy
    # rotation vs rescaling: SFT's ratio against the random draws' mean ratio, their SD as the noise
    rot = out["sft_rotates_not_rescales"]
    assert (rot["value"], rot["threshold"], rot["se"]) == (pytest.approx(math.radians(30) / 0.1), pytest.approx(2.0),
                                                           pytest.approx(math.sqrt(0.8)))
    # format collapse: the rise of eq's share, binomial SEs of the two windows' shares
    fc = out["rl_format_collapse"]
    assert (fc["value"], fc["threshold"], fc["se"]) == (pytest.approx(0.35), 0.0,
                                                        pytest.approx(math.hypot(se(0.6), se(0.95)), rel=1e-9))
    # findings that are not comparisons carry no statistic
    for fid in ("qk_change_most", "rotation_at_spectrum_ends"):
        assert not {"value", "threshold", "se"} & set(out[fid]), fid
    assert {f["held_in"] for f in out.values() if f["id"] in ALL} == {"1/1"}


def test_the_same_margin_decides_on_many_problems_and_is_within_noise_on_few():
    # sft: id 0.3 -> 0.4. SE of the gain on n problems: sqrt((0.4 * 0.6 + 0.3 * 0.7) / n) = sqrt(0.45 / n);
    # n = 100: 2 SE = 0.134 > 0.1: within noise; n = 400: 2 SE = 0.067 < 0.1: holds
    few = results(**{"models__sft__id_acc": 0.4, "n_problems__id": 100})
    f = by_id(few)["sft_gains_id"]
    assert f["holds"] is None and f["held_in"] == "0/1"
    assert f["se"] == pytest.approx(math.sqrt(0.45 / 100))
    assert f["evidence"] == "sft: id_acc 0.300 -> 0.400 (+0.100); within noise: margin +0.100 vs 2 SE = 0.134"
    f = by_id(results(**{"models__sft__id_acc": 0.4, "n_problems__id": 400}))["sft_gains_id"]
    assert (f["holds"], f["held_in"], f["evidence"]) == (True, "1/1", "sft: id_acc 0.300 -> 0.400 (+0.100)")
    # a loss of 0.1: 2 SE = 2 sqrt((0.2 * 0.8 + 0.21) / n) = 0.122 on 100 problems, 0.061 on 400
    f = by_id(results(**{"models__sft__id_acc": 0.2, "n_problems__id": 100}))["sft_gains_id"]
    assert f["holds"] is None and f["evidence"].endswith("; within noise: margin -0.100 vs 2 SE = 0.122")
    f = by_id(results(**{"models__sft__id_acc": 0.2, "n_problems__id": 400}))["sft_gains_id"]
    assert (f["holds"], f["held_in"]) == (False, "0/1") and "within noise" not in f["evidence"]
    # the OOD comparison reads the OOD problem count, not the in-domain one
    v = verdicts(results(**{"models__grpo__ood_acc": 0.3, "n_problems__ood": 100}))
    assert v["rl_generalizes_ood"] is True  # +0.25 vs 2 SE = 2 sqrt((0.05 * 0.95 + 0.3 * 0.7) / 100) = 0.101
    v = verdicts(results(**{"models__grpo__ood_acc": 0.12, "n_problems__ood": 100}))
    assert v["rl_generalizes_ood"] is None  # +0.07 vs 2 SE = 2 sqrt((0.05 * 0.95 + 0.12 * 0.88) / 100) = 0.078
    assert v["sft_gains_id"] is True
    # few in-domain problems: the in-domain gain (+0.3 vs 2 SE = 2 sqrt(0.45 / 10) = 0.42) is within noise,
    # the OOD comparison on BIG problems is not
    v = verdicts(results(**{"models__grpo__ood_acc": 0.12, "n_problems__id": 10}))
    assert v["rl_generalizes_ood"] is True and v["sft_gains_id"] is None


def test_forgetting_comparisons_within_noise():
    # grpo forgets 0.01 on one probe (0.9 -> 0.89): margin 0.04 below the 0.05 line; SE on n problems
    # sqrt((0.9 * 0.1 + 0.89 * 0.11) / n): 2 SE = 0.087 on 100 problems, 0.0087 on 10000
    f = by_id(results(**{"n_problems__retention__facts": 100}))["rl_forgets_little"]
    assert f["holds"] is None
    assert f["se"] == pytest.approx(math.sqrt((0.09 + 0.0979) / 100))
    assert f["evidence"] == "forgetting grpo +0.010; within noise: margin +0.040 vs 2 SE = 0.087"
    assert by_id(results(**{"n_problems__retention__facts": 10_000}))["rl_forgets_little"]["holds"] is True
    # sft vs grpo: margin 0.19, 2 SE = 2 sqrt((0.7 * 0.3 + 0.89 * 0.11) / n) = 0.35 on 10 problems, 0.11 on 100
    assert verdicts(results(**{"n_problems__retention__facts": 10}))["sft_forgets_more"] is None
    assert verdicts(results(**{"n_problems__retention__facts": 100}))["sft_forgets_more"] is True


def test_forgetting_standard_error_over_several_probes():
    res = results()
    res["models"]["base"]["retention"] = {"facts": 0.9, "strings": 0.5}
    res["models"]["sft"]["retention"] = {"facts": 0.7, "strings": 0.4}
    res["models"]["grpo"]["retention"] = {"facts": 0.8, "strings": 0.6}
    res["n_problems"]["retention"] = {"facts": 100, "strings": 25}
    ctx = Context(res, CFG)
    assert (ctx.n("id"), ctx.n("ood"), ctx.n("facts"), ctx.n("strings"), ctx.n("arith")) == (BIG, BIG, 100, 25, None)
    var = lambda p, n: p * (1 - p) / n  # noqa: E731
    # the mean over K = 2 probes: sqrt(sum of the four variances) / 2
    assert ctx.forgetting_se("sft", "grpo") == pytest.approx(
        math.sqrt(var(0.7, 100) + var(0.8, 100) + var(0.4, 25) + var(0.6, 25)) / 2)
    assert ctx.forgetting_se("grpo") == pytest.approx(
        math.sqrt(var(0.9, 100) + var(0.8, 100) + var(0.5, 25) + var(0.6, 25)) / 2)
    assert ctx.acc_se("sft", "id_acc") == pytest.approx(math.sqrt(0.6 * 0.4 / BIG))
    assert ctx.acc_se("grpo", "ood_acc") == pytest.approx(math.sqrt(0.25 * 0.75 / BIG))
    # a probe without a problem count: the SE is unknown
    del res["n_problems"]["retention"]["strings"]
    assert Context(res, CFG).forgetting_se("sft", "grpo") is None
    # no retention probes at all: nothing to measure
    for m in res["models"].values():
        m["retention"] = {}
    assert Context(res, CFG).forgetting_se("sft", "grpo") is None and Context(res, CFG).forgetting_se("grpo") is None


def test_without_problem_counts_comparisons_are_plain():
    # a results.json without n_problems (an older run): no standard error, the margin alone decides and
    # a tie is not a gain
    res = results(n_problems=DELETE)
    out = by_id(res)
    assert all(out[f]["se"] is None for f in ("sft_gains_id", "rl_gains_id", "sft_gains_more_id", "sft_forgets_more",
                                              "rl_forgets_little", "rl_generalizes_ood", "sft_damage_is_rotation"))
    assert {f["id"]: f["holds"] for f in out.values() if f["id"] in ALL} == dict.fromkeys(ALL, True)
    for fid, over in (("sft_gains_id", {"models__sft__id_acc": 0.3}), ("rl_gains_id", {"models__grpo__id_acc": 0.3}),
                      ("sft_gains_more_id", {"models__sft__id_acc": 0.5}), ("sft_forgets_more", {"forgetting__sft": 0.01}),
                      ("rl_forgets_little", {"forgetting__grpo": 0.05}),
                      ("rl_generalizes_ood", {"models__grpo__ood_acc": 0.05})):
        f = by_id(results(n_problems=DELETE, **over))[fid]
        assert f["holds"] is False and "within noise" not in f["evidence"], fid
    # only the in-domain count known: the OOD comparison stays plain, the in-domain ones get an SE
    out = by_id(results(n_problems={"id": 100}))
    assert out["rl_generalizes_ood"]["se"] is None and out["sft_gains_id"]["se"] is not None
    assert out["sft_forgets_more"]["se"] is None


def test_decide_against_two_standard_errors():
    assert decide(0.75, 0.25, 0.25) is None  # margin 0.5 = 2 SE exactly: not beyond
    assert decide(0.75, 0.25, 0.2499) is True
    assert decide(0.75, 0.25, 0.2501) is None
    assert decide(-0.25, 0.25, 0.25) is None
    assert decide(-0.25, 0.25, 0.2499) is False
    assert decide(-0.25, 0.25, 0.2501) is None
    assert decide(0.25, 0.25, 0.01) is None
    # no SE (or a zero one): the plain comparison, a tie does not hold
    assert decide(0.1, 0.1, None) is False and decide(0.1 + 1e-12, 0.1, None) is True
    assert decide(0.1, 0.1, 0.0) is False and decide(0.2, 0.1, 0.0) is True and decide(0.0, 0.1, 0.0) is False


def test_standard_errors_by_hand():
    assert binomial_se(0.3, 100) == pytest.approx(math.sqrt(0.21) / 10)
    assert binomial_se(0.5, 4) == pytest.approx(0.25)
    assert binomial_se(1.0, 50) == 0.0 and binomial_se(0.0, 50) == 0.0
    assert binomial_se(0.3, None) is None and binomial_se(0.3, 0) is None
    assert combine_se(0.3, 0.4) == pytest.approx(0.5)
    assert combine_se(0.3, 0.4, 1.2) == pytest.approx(1.3)
    assert combine_se(0.3, None) is None and combine_se() == 0.0


def test_t_quantiles_and_the_paired_interval():
    assert (t975(1), t975(2), t975(4), t975(20), t975(120)) == (12.706, 4.303, 2.776, 2.086, 1.980)
    # between tabulated rows the smaller df (larger quantile: conservative); beyond 120 the normal's
    assert (t975(22), t975(35), t975(119), t975(121)) == (2.086, 2.042, 2.000, 1.960)
    with pytest.raises(ValueError, match="at least 2 values"):
        t975(0)
    # margins 0.1, 0.3: mean 0.2, sd sqrt(0.02), half-width 12.706 * sqrt(0.02) / sqrt(2) = 1.2706
    assert paired_interval([0.1, 0.3]) == pytest.approx((0.2, 0.2 - 1.2706, 0.2 + 1.2706))
    # five margins 0.10..0.18: mean 0.14, sd sqrt(0.001), half-width 2.776 * sqrt(0.001 / 5)
    h = 2.776 * math.sqrt(0.001 / 5)
    assert paired_interval([0.1, 0.12, 0.14, 0.16, 0.18]) == pytest.approx((0.14, 0.14 - h, 0.14 + h))


def seed_row(fid, holds, evidence, value=None, threshold=0.0):
    row = {"id": fid, "claim": f"claim {fid}", "holds": holds, "evidence": evidence,
           "held_in": "1/1" if holds else "0/1"}
    if value is not None:
        row.update(value=value, threshold=threshold, se=0.01)
    return row


def test_aggregate_findings_over_seeds():
    margins = [0.1, 0.12, 0.14, 0.16, 0.18]
    # seed 3 alone was within noise: the interval over the seeds still excludes 0
    per_seed = {s: [seed_row("gain", None if s == 3 else True, f"e{s}", value=m - 0.05, threshold=-0.05),
                    seed_row("flag", True, f"f{s}"), seed_row("mixed", s % 2 == 0, f"m{s}"),
                    seed_row("untestable", None, "no RL method")]
                for s, m in zip((4, 3, 0, 1, 2), margins)}
    out = {f["id"]: f for f in aggregate_findings(per_seed)}
    assert list(out) == ["gain", "flag", "mixed", "untestable"]
    g = out["gain"]
    # seeds in order 0..4 carry margins 0.14, 0.16, 0.18, 0.12, 0.10
    h = 2.776 * math.sqrt(0.001 / 5)
    assert (g["holds"], g["held_in"], g["seeds"], g["per_seed"]) == (True, "4/5", [0, 1, 2, 3, 4],
                                                                      [True, True, True, None, True])
    assert g["margin_ci95"] == pytest.approx([0.14 - h, 0.14 + h])
    assert g["value"] == pytest.approx(0.14 - 0.05) and g["threshold"] == -0.05 and g["claim"] == "claim gain"
    assert g["evidence"] == ("margin over 5 seeds +0.140, 95% paired interval [+0.101, +0.179]; held in 4/5 seeds "
                             "(per seed: 0: e0; 1: e1; 2: e2; 3: e3; 4: e4)")
    assert (out["flag"]["holds"], out["flag"]["held_in"]) == (True, "5/5")
    assert out["flag"]["evidence"] == "held in 5/5 seeds (per seed: 0: f0; 1: f1; 2: f2; 3: f3; 4: f4)"
    assert (out["mixed"]["holds"], out["mixed"]["held_in"]) == (None, "3/5")
    assert (out["untestable"]["holds"], out["untestable"]["held_in"]) == (None, "0/5")
    assert "value" not in out["flag"] and "margin_ci95" not in out["mixed"]


def test_aggregate_findings_within_noise_against_and_single_seed():
    # two seeds with margins 0.1 and 0.3: the interval [-1.07, 1.47] includes 0
    out = aggregate_findings({0: [seed_row("gain", True, "a", value=0.1)], 1: [seed_row("gain", True, "b", value=0.3)]})
    assert out[0]["holds"] is None and out[0]["held_in"] == "2/2"
    assert out[0]["evidence"] == ("margin over 2 seeds +0.200, 95% paired interval [-1.071, +1.471] includes 0: within "
                                  "noise; held in 2/2 seeds (per seed: 0: a; 1: b)")
    # all margins clearly negative: does not hold
    neg = {s: [seed_row("gain", False, "x", value=-m)] for s, m in enumerate([0.1, 0.12, 0.14, 0.16, 0.18])}
    assert aggregate_findings(neg)[0]["holds"] is False
    # a claim that held in no seed does not hold
    none_held = {s: [seed_row("flag", False, "x")] for s in range(3)}
    assert aggregate_findings(none_held)[0]["holds"] is False and aggregate_findings(none_held)[0]["held_in"] == "0/3"
    # held where tested, untestable in one seed: not every seed, so no verdict
    partial = {0: [seed_row("flag", True, "x")], 1: [seed_row("flag", None, "y")]}
    assert aggregate_findings(partial)[0]["holds"] is None
    # a comparison measured in one seed only (untestable in the other) falls back to the per-seed verdicts
    mixed = {0: [seed_row("gain", True, "x", value=0.5)], 1: [seed_row("gain", None, "y")]}
    assert aggregate_findings(mixed)[0]["holds"] is None and "margin_ci95" not in aggregate_findings(mixed)[0]
    # one seed: its own verdict and evidence
    one = aggregate_findings({7: [seed_row("gain", None, "within noise here", value=0.01)]})[0]
    assert (one["holds"], one["evidence"], one["held_in"], one["seeds"]) == (None, "within noise here", "0/1", [7])


def test_problem_counts_per_accuracy():
    cfg = StudyConfig(retention=[{"task": "facts"}, {"task": "strings", "split": "id"}, {"task": "strings", "split": "ood"}])
    scores = {"points24/id": {"n": 64}, "points24/ood": {"n": 32}, "facts/id": {"n": 50}, "strings/id": {"n": 40},
              "strings/ood": {}}
    assert problem_counts(cfg, scores) == {"id": 64, "ood": 32,
                                           "retention": {"facts": 50, "strings/id": 40, "strings/ood": None}}


def test_repair_findings_read_the_repairs_from_the_base():
    # a repair from SFT's peak-OOD checkpoint with the same operator and point comes first in the sweep:
    # the claims are about restoring the base, so it is not the one read
    res = results()
    peak = {**res["repairs"]["uv20"], "source": "sft_peak_ood", "ood_recovered_frac": 0.0}
    res["repairs"] = {"uv20@sft_peak_ood": peak, **res["repairs"]}
    f = by_id(res)["uv_top20_recovers_ood"]
    assert (f["value"], f["holds"]) == (0.8, True) and f["evidence"].startswith("uv20:")


def test_repairs_without_a_recorded_gap_cannot_be_tested():
    # results.json written before the recovered fraction had its noise rule: no ood_gap at all
    res = results(**{"repairs__uv20__ood_recovered_frac": None, "repairs__uv20__ood_gap": DELETE,
                     "repairs__dir100__ood_recovered_frac": None, "repairs__dir100__ood_gap": DELETE})
    out = by_id(res)
    for fid in ("uv_top20_recovers_ood", "sft_damage_is_rotation"):
        assert out[fid]["holds"] is None and out[fid]["evidence"].startswith("cannot test: the sweep recorded no OOD gap; ")
    assert "(gap to recover n/a)" in out["uv_top20_recovers_ood"]["evidence"]


def test_difference_of_recovered_fractions_has_no_se_without_the_gaps_se():
    res = results(**{"repairs__dir100__ood_gap_se": None})
    rot = by_id(res)["sft_damage_is_rotation"]
    assert rot["se"] is None and rot["value"] == pytest.approx(0.7)


def test_retention_probes_are_named_by_task_or_lm_eval_task():
    from posttrain.config import LmEvalRef, TaskRef
    from posttrain.results import retention_label

    assert retention_label(LmEvalRef(lm_eval="mmlu", limit=5)) == "mmlu"
    assert retention_label(TaskRef(task="facts")) == "facts"
