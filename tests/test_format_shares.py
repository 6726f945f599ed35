"""Format shares over training steps (Echo Chamber's figure) and the rl_format_collapse rule on them."""

import math

import pytest

from posttrain.analysis.format_shares import format_series, start_end, window_share
from posttrain.config import StudyConfig, TrainConfig
from posttrain.findings import evaluate_findings


def test_format_series_reads_rl_steps_and_one_point_per_expert_iteration_round():
    rows = [{"step": 0, "trainable_params": 10},
            {"step": 1, "rollout/reward": 0.5, "rollout/samples": 8.0, "rollout/format/eq": 0.75,
             "rollout/format/steps": 0.125},
            {"step": 2, "skipped": 1},
            {"step": 3, "rollout/reward": 0.5, "rollout/samples": 8.0, "rollout/format/steps": 1.0}]
    assert format_series(rows) == [{"step": 1, "samples": 8, "shares": {"eq": 0.75, "steps": 0.125}},
                                   {"step": 3, "samples": 8, "shares": {"steps": 1.0}}]
    # Expert Iteration repeats its round's sample stats on every step of the round: one point per round
    ei = [{"step": s, "filtered/round": float(r), "filtered/samples": 40.0, "filtered/format/eq": f}
          for s, r, f in ((1, 0, 0.5), (2, 0, 0.5), (3, 1, 0.9), (4, 1, 0.9))]
    assert format_series(ei) == [{"step": 1, "samples": 40, "shares": {"eq": 0.5}},
                                 {"step": 3, "samples": 40, "shares": {"eq": 0.9}}]
    assert format_series([{"step": 1, "loss": 0.3}]) == []  # SFT on expert data: no sampling
    # a step whose samples were all malformed has no format keys but is a point (every share 0);
    # a log from before rollout/samples was logged has no count
    old = [{"step": 1, "rollout/reward": 0.0, "rollout/malformed": 1.0}, {"step": 2, "rollout/reward": 0.5,
                                                                          "rollout/format/eq": 0.5}]
    assert format_series(old) == [{"step": 1, "samples": None, "shares": {}},
                                  {"step": 2, "samples": None, "shares": {"eq": 0.5}}]


def test_windows_and_weighted_shares_by_hand():
    pts = [{"step": i, "samples": n, "shares": {"eq": p}} for i, (n, p) in enumerate([(10, 0.5), (30, 0.1), (8, 1.0)])]
    # (10 * 0.5 + 30 * 0.1) / 40 = 0.2; a format never sampled has share 0
    assert window_share(pts[:2], "eq") == (pytest.approx(0.2), 40)
    assert window_share(pts, "steps") == (0.0, 48)
    assert window_share([], "eq") == (0.0, 0)
    # 10% of the points, at least one, never overlapping
    assert start_end(pts) == (pts[:1], pts[-1:])
    many = [{"step": i, "samples": 1, "shares": {}} for i in range(25)]
    first, last = start_end(many)
    assert [p["step"] for p in first] == [0, 1] and [p["step"] for p in last] == [23, 24]
    assert start_end(pts[:1]) is None and start_end([]) is None


def _run(series, base_fmt):
    model = {"id_acc": 0.5, "ood_acc": 0.2, "retention": {}, "format_share": base_fmt}
    return {"models": {"base": model, "grpo": model, "ei": model, "grpo2": model},
            "n_problems": {"id": 100, "ood": 100, "retention": {}}, "forgetting": {"grpo": 0.0, "ei": 0.0, "grpo2": 0.0},
            "diagnostics": {}, "format_trajectories": series}


def test_every_rl_and_expert_iteration_method_must_collapse_the_worst_decides():
    cfg = StudyConfig(methods={"grpo": TrainConfig(objective="grpo"),
                               "ei": TrainConfig(objective="sft", data="filtered", rounds=2),
                               "grpo2": TrainConfig(objective="grpo", init="grpo")})  # from grpo: not counted
    up = [{"step": s, "samples": 1000, "shares": {"eq": p}} for s, p in ((1, 0.5), (2, 0.9))]
    flat = [{"step": s, "samples": 1000, "shares": {"eq": 0.5}} for s in (1, 2)]
    down = [{"step": s, "samples": 1000, "shares": {"eq": p}} for s, p in ((1, 0.5), (2, 0.1))]
    base = {"eq": 0.6, "steps": 0.4}

    def verdict(series):
        return next(f for f in evaluate_findings(_run(series, base), cfg) if f["id"] == "rl_format_collapse")

    f = verdict({"grpo": up, "ei": up, "grpo2": down})
    assert f["holds"] is True and f["value"] == pytest.approx(0.4)
    assert f["evidence"] == ("share of the base's top format eq (base 0.60) in the samples of training; grpo: 0.50 -> "
                             "0.90 (+0.40, steps 1-1 vs 2-2); ei: 0.50 -> 0.90 (+0.40, steps 1-1 vs 2-2)")
    # one method without a rise: within noise for the claim about every method; one that fell: it fails
    assert verdict({"grpo": up, "ei": flat})["holds"] is None
    f = verdict({"grpo": up, "ei": down})
    se = math.sqrt(0.5 * 0.5 / 1000 + 0.1 * 0.9 / 1000)
    assert (f["holds"], f["value"], f["se"]) == (False, pytest.approx(-0.4), pytest.approx(se))
    # old logs without sample counts: prompts_per_step x samples_per_prompt (16 x 8 by default)
    nocount = [{**p, "samples": None} for p in down]
    f = verdict({"grpo": up, "ei": nocount})
    assert (f["holds"], f["se"]) == (False, pytest.approx(math.sqrt(0.5 * 0.5 / 128 + 0.1 * 0.9 / 128)))
    # a method with one sampling round is left out, saying so; none left: untestable
    f = verdict({"grpo": up, "ei": up[:1]})
    assert f["holds"] is True and f["evidence"].endswith("; ei: one sampling round")
    f = verdict({"grpo": up[:1]})
    assert f["holds"] is None and f["evidence"].endswith("grpo: one sampling round; ei: no format shares over steps")


def test_report_draws_format_shares_over_training(tmp_path):
    from posttrain.io import atomic_write_json
    from posttrain.report.html import write_report

    model = {"id_acc": 0.5, "ood_acc": 0.2, "retention": {"facts": 0.8}, "id_malformed": 0.0,
             "format_share": {"eq": 0.6, "steps": 0.4}}
    res = {"study": "toy", "seed": 0, "wall_seconds": 1.0, "id_task": "points24/id", "ood_task": "points24/ood",
           "retention_tasks": ["facts/id"], "models": {"base": model, "grpo": model}, "forgetting": {"grpo": 0.0},
           "diagnostics": {}, "findings": [], "training": {"grpo": {}},
           "format_trajectories": {"grpo": [{"step": s, "samples": 8, "shares": {"eq": 0.5 + 0.1 * s}} for s in (1, 2, 3)]}}
    atomic_write_json(tmp_path / "results.json", res)
    page = write_report(tmp_path).read_text()
    assert "Format shares over training" in page and 'alt="format shares over training"' in page
    del res["format_trajectories"]
    atomic_write_json(tmp_path / "results.json", res)
    assert "Format shares over training" not in write_report(tmp_path).read_text()


def test_format_share_panels_one_line_per_format():
    from posttrain.report.plots import format_share_curves

    fig = format_share_curves({"grpo": [{"step": 1, "samples": 4, "shares": {"eq": 0.25}},
                                        {"step": 2, "samples": 4, "shares": {"eq": 0.5, "steps": 0.5}}],
                               "ei": [{"step": 1, "samples": 4, "shares": {"steps": 1.0}}]})
    ax = fig.axes[0]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    # a format missing at a step has share 0 there
    assert lines == {"eq": [0.25, 0.5], "steps": [0.0, 0.5]} and ax.get_title() == "grpo: format shares of its samples"


def test_start_end_windows_are_at_most_half_the_points():
    from posttrain.analysis.format_shares import start_end

    pts = [{"step": i} for i in range(5)]
    assert start_end(pts, frac=1.0) == (pts[:2], pts[-2:])


def test_read_format_series_skips_unreadable_lines_and_rows_without_a_step(tmp_path):
    from posttrain.analysis.format_shares import read_format_series

    lines = ['{"step": 1, "rollout/reward": 0.5, "rollout/samples": 4, "rollout/format/eq": 1.0}',
             '{"step": 2, "rollout/rew',  # a torn write
             '{"rollout/reward": 0.5, "rollout/samples": 4}',  # no step
             '["step"]',
             '{"step": 3, "rollout/reward": 0.5, "rollout/samples": 4, "rollout/format/eq": 0.5}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    got = read_format_series(tmp_path / "metrics.jsonl")
    assert got == [{"step": 1, "samples": 4, "shares": {"eq": 1.0}}, {"step": 3, "samples": 4, "shares": {"eq": 0.5}}]
