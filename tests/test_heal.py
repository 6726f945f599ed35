"""RL started from SFT checkpoints (arXiv 2508.16546): `init` references, repair sources, kept-checkpoint
peaks, and the healing findings on made-up results."""

import pytest

from posttrain.config import build_study_config
from posttrain.errors import UserError
from posttrain.findings import FINDINGS, Context, evaluate_findings
from posttrain.study import method_order, peak_ood, resolve_start, Run

SFT = {"objective": "sft", "steps": 150, "checkpoint_every": 50}


def study(methods, **extra):
    return build_study_config({"methods": methods, **extra})


# ---- config: init references ---------------------------------------------------------------------

def test_init_references_resolve_and_order():
    cfg = study({
        "rl_peak": {"objective": "grpo", "init": "sft@peak_ood"},
        "rl_50": {"objective": "grpo", "init": "sft@step-50"},
        "rl_end": {"objective": "grpo", "init": "sft@end"},
        "rl_long": {"objective": "grpo", "init": "sft_long"},
        "sft": SFT,
        "sft_long": {**SFT, "steps": 450},
        "ei": {"method": "ei"},  # filtered self-samples: not SFT on expert data
    })
    order = method_order(cfg)
    for rl, src in [("rl_peak", "sft"), ("rl_50", "sft"), ("rl_end", "sft"), ("rl_long", "sft_long")]:
        assert order.index(src) < order.index(rl)
    assert cfg.methods["sft"].kept_steps == [50, 100, 150]
    # expert SFT with kept checkpoints are evaluated at each checkpoint (the peak of sft is needed anyway)
    assert cfg.checkpoint_eval_methods == ["sft", "sft_long"]


@pytest.mark.parametrize("methods,match", [
    ({"sft": SFT, "rl": {"objective": "grpo", "init": "nope@step-50"}}, "names no method 'nope'"),
    ({"sft": SFT, "rl": {"objective": "grpo", "init": "sft@step-40"}}, "sft keeps no step-40 .*every 50"),
    ({"sft": SFT, "rl": {"objective": "grpo", "init": "sft@step-200"}}, "keeps no step-200"),
    ({"sft": {**SFT, "checkpoint_every": 0}, "rl": {"objective": "grpo", "init": "sft@step-50"}}, "keeps no checkpoints"),
    ({"sft": {**SFT, "checkpoint_every": 0}, "rl": {"objective": "grpo", "init": "sft@peak_ood"}},
     "needs sft to keep checkpoints"),
    ({"sft": SFT, "rl": {"objective": "grpo", "init": "sft@best"}}, "expected step-<N>, peak_ood or end"),
    ({"sft": SFT, "rl": {"objective": "grpo", "init": "sft@step-0"}}, "expected step-<N>"),
    ({"sft": {**SFT, "init": "sft@step-50"}}, "refers to the method itself"),
    ({"sft": {**SFT, "init": "sft"}}, "refers to the method itself"),
    ({"a": {**SFT, "init": "b@step-50"}, "b": {**SFT, "init": "a@end"}}, "cycle"),
    ({"sft": SFT, "rl": {"objective": "grpo", "init": "/no/such/dir"}}, "neither 'base', a method"),
])
def test_bad_init_references_are_one_line_errors(methods, match):
    with pytest.raises(UserError, match=match) as e:
        study(methods)
    assert "\n" not in str(e.value)


def test_init_may_be_a_directory_even_with_an_at_sign(tmp_path):
    d = tmp_path / "ck@v1"
    d.mkdir()
    cfg = study({"sft": SFT, "rl": {"objective": "grpo", "init": str(d)}})
    assert method_order(cfg) == ["sft", "rl"]


# ---- config: repair sources ----------------------------------------------------------------------

def test_repair_source_values(tmp_path):
    cfg = study({"sft": SFT, "grpo": {"objective": "grpo"}})
    assert cfg.repair.sources == ["base"] and cfg.repair.reference == "source"
    cfg = study({"sft": SFT}, repair={"source": ["base", "sft_peak_ood", str(tmp_path)]})
    assert cfg.repair.sources == ["base", "sft_peak_ood", str(tmp_path)]
    assert cfg.checkpoint_eval_methods == ["sft"]
    # the damaged method's peak is evaluated even when it is not SFT on expert data
    cfg = study({"g": {"objective": "grpo", "checkpoint_every": 50}},
                repair={"source": "sft_peak_ood", "damaged": "g"})
    assert cfg.checkpoint_eval_methods == ["g"]


@pytest.mark.parametrize("repair,match", [
    ({"source": "nowhere"}, "neither 'base', 'sft_peak_ood' nor a checkpoint directory"),
    ({"source": []}, "empty list"),
    ({"source": ["base", "base"]}, "lists 'base' twice"),
    ({"reference": "nope"}, "repair.reference"),
])
def test_bad_repair_sources_are_one_line_errors(repair, match):
    with pytest.raises(UserError, match=match) as e:
        study({"sft": SFT}, repair=repair)
    assert "\n" not in str(e.value)


def test_peak_source_needs_kept_checkpoints():
    with pytest.raises(UserError, match="sft_peak_ood needs the damaged method 'sft' to keep checkpoints"):
        study({"sft": {**SFT, "checkpoint_every": 0}}, repair={"source": ["base", "sft_peak_ood"]})
    # no sweep, nothing to check
    study({"sft": {**SFT, "checkpoint_every": 0}}, repair={"source": "sft_peak_ood", "damaged": None})


# ---- the study's resolution of a start ---------------------------------------------------------------

def test_peak_ood_is_the_best_ood_point_earliest_on_ties():
    pts = [{"step": 50, "id_acc": 0.2, "ood_acc": 0.3}, {"step": 100, "id_acc": 0.5, "ood_acc": 0.4},
           {"step": 150, "id_acc": 0.6, "ood_acc": 0.4}]
    assert peak_ood(pts)["step"] == 100
    assert peak_ood(pts[2:])["step"] == 150
    with pytest.raises(ValueError):
        peak_ood([])


def test_start_key_names_the_checkpoint(tmp_path):
    cfg = study({"sft": SFT, "a": {"objective": "grpo", "init": "sft@step-50"}, "b": {"objective": "grpo", "init": "sft"},
                 "c": {"objective": "grpo", "init": "sft@peak_ood"}, "d": {"objective": "grpo", "init": "sft@step-150"}})
    run = Run(tmp_path)
    for step in (50, 100):
        (run.method("sft") / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run.method("sft") / "checkpoints" / f"step-{step}" / "config.json").write_text("{}")
    dirs = {"base": tmp_path / "base", "sft": run.method("sft") / "model"}
    keys = {"base": "kb", "sft": "ks"}
    got = {n: resolve_start(cfg, cfg.methods[n], run, dirs, keys, {"sft": {"step": 100}}) for n in "abcd"}
    assert got["a"][0] == run.method("sft") / "checkpoints" / "step-50" and got["a"][2]["step"] == 50
    assert got["b"][:2] == (dirs["sft"], "ks") and got["d"][:2] == (dirs["sft"], "ks")  # the final model
    assert got["c"][0].name == "step-100" and got["c"][2] == {"init": "sft@peak_ood", "method": "sft", "step": 100}
    assert len({got[n][1] for n in "abc"}) == 3 and "ks" not in (got["a"][1], got["c"][1])
    # the checkpoint key follows the SFT run's key
    assert resolve_start(cfg, cfg.methods["a"], run, dirs, {**keys, "sft": "other"}, {})[1] != got["a"][1]
    with pytest.raises(UserError, match="step-50: the checkpoint that init 'sft@step-50' names is missing"):
        resolve_start(cfg, cfg.methods["a"], Run(tmp_path / "empty"), dirs, keys, {})


# ---- findings on made-up results ---------------------------------------------------------------------

HEAL_METHODS = {
    "sft": SFT,
    "grpo": {"objective": "grpo"},
    "sft_long": {**SFT, "steps": 450},
    "rl_sft": {"objective": "grpo", "init": "sft"},
    "rl_peak": {"objective": "grpo", "init": "sft@peak_ood"},
    "rl_long": {"objective": "grpo", "init": "sft_long"},
}
HEAL_CFG = study(HEAL_METHODS)


def results(ood: dict, angles: dict | None = None, n: int = 400, methods=HEAL_METHODS) -> dict:
    models = {k: {"id_acc": 0.5, "ood_acc": v, "retention": {}, "format_share": {"eq": 1.0}} for k, v in ood.items()}
    return {"models": models, "forgetting": {k: 0.0 for k in models if k != "base"},
            "n_problems": {"id": n, "ood": n, "retention": {}},
            "diagnostics": {k: {"principal_angle_top": a} for k, a in (angles or {}).items()},
            "init_from": {"rl_peak": {"init": "sft@peak_ood", "method": "sft", "step": 50},
                          "rl_sft": {"init": "sft", "method": "sft", "step": 150},
                          "rl_long": {"init": "sft_long", "method": "sft_long", "step": 450}},
            "peak_ood": {"sft": {"step": 50, "ood_acc": 0.45, "id_acc": 0.4}},
            "checkpoint_evals": {"sft": [{"step": 50, "id_acc": 0.4, "ood_acc": 0.45}]},
            "repairs": {}}


def verdict(res: dict, fid: str, cfg=HEAL_CFG) -> dict:
    return next(f for f in evaluate_findings(res, cfg) if f["id"] == fid)


OOD = {"base": 0.5, "sft": 0.2, "grpo": 0.5, "sft_long": 0.1, "rl_sft": 0.4, "rl_peak": 0.45, "rl_long": 0.15}


def test_new_findings_are_registered_with_their_rule():
    for fid in ("rl_heals_sft_ood", "stronger_sft_heals_better", "rl_undoes_sft_rotation"):
        assert fid in FINDINGS and "2508.16546" in FINDINGS[fid].paper
    assert "2 SE" in FINDINGS["rl_heals_sft_ood"].claim and "(ood(base) - ood(SFT))" in FINDINGS["rl_heals_sft_ood"].claim


@pytest.mark.parametrize("rl_sft,holds,note", [
    (0.40, True, "recovered 67%"),
    (0.10, False, "recovered -33%"),
    (0.21, None, "within noise"),
])
def test_rl_heals_sft_ood(rl_sft, holds, note):
    f = verdict(results({**OOD, "rl_sft": rl_sft}), "rl_heals_sft_ood")
    assert f["holds"] is holds and note in f["evidence"] and "rl_sft" in f["evidence"] and "sft@step-150" in f["evidence"]


@pytest.mark.parametrize("base,sft", [(0.3, 0.4), (0.21, 0.2), (0.2, 0.2)])
def test_rl_heals_is_untestable_when_sft_lost_nothing_beyond_noise(base, sft):
    f = verdict(results({**OOD, "base": base, "sft": sft}), "rl_heals_sft_ood")
    assert f["holds"] is None and "did not lose OOD accuracy beyond noise" in f["evidence"] and "value" not in f


def test_rl_heals_needs_rl_from_the_sft_model():
    # without RL from sft's final model, RL from another SFT method's final model is used
    cfg = study({k: v for k, v in HEAL_METHODS.items() if k != "rl_sft"})
    f = verdict(results({k: v for k, v in OOD.items() if k != "rl_sft"}), "rl_heals_sft_ood", cfg)
    assert f["holds"] is True and "rl_long (RL from sft_long@step-450)" in f["evidence"]
    drop = ("rl_sft", "rl_long")
    cfg = study({k: v for k, v in HEAL_METHODS.items() if k not in drop})
    f = verdict(results({k: v for k, v in OOD.items() if k not in drop}), "rl_heals_sft_ood", cfg)
    assert f["holds"] is None and f["evidence"].startswith("this run has no RL method started from")
    cfg = study({"grpo": {"objective": "grpo"}})
    f = verdict(results({"base": 0.5, "grpo": 0.5}), "stronger_sft_heals_better", cfg)
    assert f["holds"] is None and f["evidence"] == "this run has no SFT method"


@pytest.mark.parametrize("peak,long,holds", [(0.45, 0.15, True), (0.15, 0.45, False), (0.30, 0.29, None)])
def test_stronger_sft_heals_better(peak, long, holds):
    f = verdict(results({**OOD, "rl_peak": peak, "rl_long": long}), "stronger_sft_heals_better")
    assert f["holds"] is holds
    assert "rl_peak (RL from sft@step-50, start ood 0.450)" in f["evidence"] and "rl_long (RL from sft_long@step-450)" in f["evidence"]


def test_stronger_sft_without_peak_uses_the_least_trained_start():
    methods = {k: v for k, v in HEAL_METHODS.items() if k != "rl_peak"}
    f = verdict(results({k: v for k, v in OOD.items() if k != "rl_peak"}, methods=methods), "stronger_sft_heals_better",
                study(methods))
    assert f["holds"] is True and f["evidence"].startswith("rl_sft (RL from sft@step-150")
    one = {k: v for k, v in methods.items() if k != "rl_long"}
    f = verdict(results({k: v for k, v in OOD.items() if k not in ("rl_peak", "rl_long")}), "stronger_sft_heals_better",
                study(one))
    assert f["holds"] is None and "two different SFT checkpoints" in f["evidence"]


@pytest.mark.parametrize("a_sft,a_rl,holds", [(10.0, 8.0, True), (10.0, 12.0, False)])
def test_rl_undoes_sft_rotation(a_sft, a_rl, holds):
    angles = {"sft": a_sft, "rl_sft": a_rl, "grpo": 1.0}
    f = verdict(results(OOD, angles), "rl_undoes_sft_rotation")
    assert f["holds"] is holds and f["se"] is None and f["value"] == pytest.approx(a_sft - a_rl)
    assert f"sft {a_sft:.2f} deg" in f["evidence"] and f"rl_sft (RL from sft@step-150) {a_rl:.2f} deg" in f["evidence"]
    f = verdict(results(OOD, {}), "rl_undoes_sft_rotation")
    assert f["holds"] is None and "no spectral diagnostics" in f["evidence"]


def test_the_rl_role_is_rl_from_the_base():
    ctx = Context(results(OOD), HEAL_CFG)
    assert (ctx.sft, ctx.rl) == ("sft", "grpo")
    # RL on top of SFT alone is no "RL method" for the SFT-vs-RL comparisons
    cfg = study({"sft": SFT, "rl_sft": {"objective": "grpo", "init": "sft"}})
    ctx = Context(results({"base": 0.5, "sft": 0.2, "rl_sft": 0.4}), cfg)
    assert ctx.rl is None


def test_repair_findings_read_the_base_source():
    from posttrain.findings.repairs import repair_pick

    reps = {"uv@sft_peak_ood": {"method": "uv_merge", "params": {"top": 0.2}, "source": "sft_peak_ood"},
            "uv@base": {"method": "uv_merge", "params": {"top": 0.2}, "source": "base"}}
    assert repair_pick(reps, "uv_merge", top=0.2)[0] == "uv@base"
    assert repair_pick(reps, "uv_merge", source="sft_peak_ood", top=0.2)[0] == "uv@sft_peak_ood"
    assert repair_pick({"uv": {"method": "uv_merge", "params": {"top": 0.2}}}, "uv_merge", top=0.2)[0] == "uv"


# ---- report --------------------------------------------------------------------------------------------

def test_report_shows_the_checkpoint_curve_and_the_rl_starts():
    from posttrain.report.html import healing_section, repair_section

    res = results(OOD)
    res.update(id_task="points24/id", ood_task="points24/ood",
               checkpoint_evals={"sft": [{"step": 50, "id_acc": 0.4, "ood_acc": 0.45}, {"step": 150, "id_acc": 0.6, "ood_acc": 0.2}]})
    curves = {"rl_sft": [{"step": 0, "eval/points24/ood/acc": 0.2, "eval/points24/id/acc": 0.6},
                         {"step": 10, "eval/points24/ood/acc": 0.3}]}
    html = healing_section(res, curves)
    assert "RL from SFT checkpoints" in html and html.count("data:image/png;base64,") == 1
    assert "sft: step 50 (OOD 45.0%" in html and "rl_peak from <code>sft@peak_ood</code> (step 50)" in html
    assert healing_section({**res, "checkpoint_evals": {}, "init_from": {}}, {}) == ""
    # repair rows name their source; one plot per source
    rep = {"method": "uv_merge", "params": {}, "id_acc": 0.5, "ood_acc": 0.3, "x": 0.2, "series": "uv", "axis": "top",
           "ood_recovered_frac": 0.5, "id_kept_frac": 0.5, "ood_gap": 0.2}
    reps = {"uv@base": {**rep, "source": "base", "source_model": "base", "reference": "base", "reference_ood_acc": 0.5},
            "uv@sft_peak_ood": {**rep, "source": "sft_peak_ood", "source_model": "sft@step-50", "reference": "sft@step-50",
                                "reference_ood_acc": 0.45}}
    html = repair_section({"repairs": reps, "repair_sources": {}})
    assert "From sft@step-50" in html and "From base" in html and html.count("data:image/png;base64,") == 2
    assert '<td class="l">sft@step-50</td>' in html


def test_rl_from_sft_reads_the_resolved_start_and_falls_back_to_the_config(tmp_path):
    from posttrain.findings.heal import Start, rl_from_sft

    gone = tmp_path / "ck@v1"
    gone.mkdir()
    methods = {**HEAL_METHODS,
               "rl_dir": {"objective": "grpo", "init": str(gone)},  # a checkpoint directory, deleted since
               "rl_50": {"objective": "grpo", "init": "sft@step-50"},
               "sft_on_sft": {**SFT, "init": "sft"},  # SFT on top of SFT: not RL
               "rl_ei": {"objective": "grpo", "init": "ei"}, "ei": {"method": "ei"},  # from a method not on expert data
               "rl_untrained": {"objective": "grpo", "init": "sft"}}
    cfg = study(methods)
    gone.rmdir()
    ood = {**OOD, "rl_dir": 0.3, "rl_50": 0.3, "sft_on_sft": 0.3, "rl_ei": 0.3, "ei": 0.3}
    res = results(ood, methods=methods)
    # results.json's resolved steps win over what the config says (the peak moved to step 100 here)
    res["init_from"]["rl_peak"]["step"] = 100
    res["init_from"]["rl_sft"]["step"] = 149
    assert rl_from_sft(Context(res, cfg)) == [
        Start("rl_sft", "sft", 149, "end"), Start("rl_peak", "sft", 100, "peak_ood"),
        Start("rl_long", "sft_long", 450, "end"), Start("rl_50", "sft", 50, "step-50")]
    # without them (an older results.json): end -> the SFT method's steps, peak_ood -> the study's peak
    del res["init_from"]
    res["peak_ood"]["sft"]["step"] = 100
    assert rl_from_sft(Context(res, cfg)) == [
        Start("rl_sft", "sft", 150, "end"), Start("rl_peak", "sft", 100, "peak_ood"),
        Start("rl_long", "sft_long", 450, "end"), Start("rl_50", "sft", 50, "step-50")]
    del res["peak_ood"]
    assert rl_from_sft(Context(res, cfg))[1] == Start("rl_peak", "sft", None, "peak_ood")
    assert Start("rl_peak", "sft", None, "peak_ood").label == "sft@peak_ood"
