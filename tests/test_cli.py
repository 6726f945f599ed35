"""The CLI: exit codes and one-line errors, and the quick demo end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=900)


@pytest.mark.parametrize("args,match", [
    (["diff", "/nonexistent/a", "/nonexistent/b", "--out", "/tmp/x"], "checkpoint not found"),
    (["demo", "--preset", "huge"], "unknown preset"),
    (["demo", "--set", "pretrain.steps=-1"], "pretrain.steps"),
    (["study", "/nonexistent.yaml"], "config file not found"),
    (["report", "/nonexistent"], "run directory not found"),
    (["eval", "/nonexistent", "--tasks", "points24/id"], "checkpoint not found: /nonexistent$"),
    (["eval", "/nonexistent", "--tasks", " , "], "names no task"),
])
def test_bad_input_exits_2_with_one_line(args, match):
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    import re

    assert re.search(match, lines[0])


def test_usage_error_exits_2():
    assert cli("diff").returncode == 2


def test_diff_cli_on_checkpoints(tiny_checkpoint, tmp_path):
    r = cli("diff", tiny_checkpoint, tiny_checkpoint, "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    js = json.loads((tmp_path / "d" / "diff.json").read_text())
    (name,) = js["models"]
    assert js["models"][name]["rel_update_total"] == 0.0
    # two unchanged copies: the cosine between zero updates is undefined, and said so
    r = cli("diff", tiny_checkpoint, tiny_checkpoint, tiny_checkpoint, "--out", tmp_path / "d2")
    assert r.returncode == 0, r.stderr
    assert "cosine of the updates undefined" in r.stdout and "nan" not in r.stdout


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_study):
    out = quick_study
    res = json.loads((out / "results.json").read_text())
    heal = {"sft_long", "grpo_from_sft", "grpo_from_peak", "grpo_from_long"}
    assert set(res["models"]) == {"base", "sft", "grpo"} | heal
    for name, m in res["models"].items():
        # results.json carries the numbers of the evaluation stage, not others
        scores = json.loads((out / "eval" / f"{name}.json").read_text())
        assert m["id_acc"] == scores["points24/id"]["acc"] and m["ood_acc"] == scores["points24/ood"]["acc"]
        assert m["retention"] == {t: scores[f"{t}/id"]["acc"] for t in ("facts", "strings", "arith")}
        assert abs(sum(m["format_share"].values()) - 1) < 1e-6
    # forgetting is the mean retention drop from the base (positive = forgot)
    base_ret = res["models"]["base"]["retention"]
    assert set(res["forgetting"]) == {"sft", "grpo"} | heal
    for name, f in res["forgetting"].items():
        ret = res["models"][name]["retention"]
        assert f == pytest.approx(sum(base_ret[t] - ret[t] for t in base_ret) / 3, abs=1e-12)
    # RL from SFT checkpoints: every kept SFT checkpoint evaluated, the peak picked, the starts recorded
    assert [p["step"] for p in res["checkpoint_evals"]["sft"]] == [2, 4]
    assert [p["step"] for p in res["checkpoint_evals"]["sft_long"]] == [4, 8, 12]
    assert res["checkpoint_evals"]["sft"][-1]["ood_acc"] == res["models"]["sft"]["ood_acc"]
    peak = res["peak_ood"]["sft"]
    assert peak["ood_acc"] == max(p["ood_acc"] for p in res["checkpoint_evals"]["sft"])
    assert res["init_from"]["grpo_from_peak"] == {"init": "sft@peak_ood", "method": "sft", "step": peak["step"]}
    assert res["init_from"]["grpo_from_long"]["step"] == 12 and "grpo" not in res["init_from"]
    # repairs from both sources, each naming its source; the peak source is skipped when it is the final model
    srcs = res["repair_sources"]
    assert set(srcs) == {"base", "sft_peak_ood"} and ("skipped" in srcs["sft_peak_ood"]) == (peak["step"] == 4)
    assert {r["source"] for r in res["repairs"].values()} == {"base"} | ({"sft_peak_ood"} - {k for k, v in srcs.items()
                                                                                               if "skipped" in v})
    for name, r in res["repairs"].items():
        assert name.endswith("@" + r["source"]) and r["reference_ood_acc"] == srcs[r["source"]]["ood_acc"]
    for name in ("sft", "grpo"):
        d = res["diagnostics"][name]
        assert {"q_proj", "k_proj", "down_proj"} <= set(d["rel_update_by_module"])
        assert len(d["rel_update_by_layer"]) == 2
        # the study's diff is spectral: angles in degrees, angle curve over the spectrum
        assert 0 <= d["principal_angle_top"] <= 90 and d["sv_rel_change_top"] >= 0
        assert len(d["angle_curve"]["x"]) == len(d["angle_curve"]["left"]) > 0
        # checkpoint_every: 2 over 4 steps gives a two-point trajectory per method
        assert [p["step"] for p in res["trajectories"][name]] == [2, 4]
        # the random-update null of sft_rotates_not_rescales, for the final models that moved
        if d["rel_update_total"] > 0:
            assert 0 <= d["null_principal_angle_top"] <= 90 and d["null_sv_rel_change_top_d0"] >= 0
        else:
            assert d["null_principal_angle_top"] is None
    # the formats of the samples of every on-policy step (4 prompts x 4 samples); SFT on expert data samples none
    assert [(p["step"], p["samples"]) for p in res["format_trajectories"]["grpo"]] == [(s, 16) for s in (1, 2, 3, 4)]
    assert "sft" not in res["format_trajectories"]
    cos = res["diagnostic_pairs"]["sft|grpo"]["cosine_total"]  # None when one update is exactly zero
    assert (cos is None) == (res["diagnostics"]["grpo"]["rel_update_total"] == 0) and (cos is None or -1 <= cos <= 1)
    # the findings are what the rules give on the numbers in results.json
    from posttrain.config import load_study_config
    from posttrain.findings import decide, evaluate_findings

    findings = {f["id"]: f for f in res["findings"]}
    assert res["findings"] == evaluate_findings(res, load_study_config(out / "config.yaml"))
    assert {"sft_forgets_more", "rl_gains_id", "qk_change_most",
            "rl_heals_sft_ood", "stronger_sft_heals_better", "rl_undoes_sft_rotation"} <= set(findings)
    assert "grpo_from_sft" in findings["rl_undoes_sft_rotation"]["evidence"]
    assert findings["rl_undoes_sft_rotation"]["holds"] is not None
    assert "grpo_from_long" in findings["stronger_sft_heals_better"]["evidence"]
    forg, models, n = res["forgetting"], res["models"], res["n_problems"]
    # the comparisons carry their statistic; the verdict is the noise rule applied to it (within
    # 2 binomial standard errors: None)
    sfm, rfl, rgi = findings["sft_forgets_more"], findings["rl_forgets_little"], findings["rl_gains_id"]
    assert (sfm["value"], sfm["threshold"]) == (pytest.approx(forg["sft"] - forg["grpo"]), 0.0)
    assert (rfl["value"], rfl["threshold"]) == (pytest.approx(-forg["grpo"]), -0.05)
    assert (rgi["value"], rgi["threshold"]) == (pytest.approx(models["grpo"]["id_acc"] - models["base"]["id_acc"]), 0.0)
    var = lambda p, k: p * (1 - p) / k  # noqa: E731
    assert rgi["se"] == pytest.approx((var(models["grpo"]["id_acc"], n["id"]) + var(models["base"]["id_acc"], n["id"])) ** 0.5)
    for f in (sfm, rfl, rgi):
        assert f["holds"] == decide(f["value"], f["threshold"], f["se"]), f["id"]
    assert all(f["evidence"] for f in res["findings"])
    # both KLs to the base for every trained model (exactly 0 for a model whose weights did not move)
    for name, k in res["kl_to_base"].items():
        assert k["task"] == "points24/id" and (k["n_prompts"], k["n_samples"]) == (16, 4)
        unmoved = res["diagnostics"][name]["rel_update_total"] == 0
        for key in ("kl_pi_pi0_per_seq", "kl_pi_pi0_per_token", "kl_pi0_pi_per_seq", "kl_pi0_pi_per_token"):
            assert (k[key] == 0) == unmoved and k[f"{key}_se"] >= 0, (name, key)
    assert set(res["kl_to_base"]) == {"sft", "grpo"} | heal and res["forgetting_predictors"]["kl_pi0_pi_per_seq"]["n"] == 6
    (kl_f,) = [f for f in res["findings"] if f["id"] == "kl_predicts_forgetting"]
    assert kl_f["n_models"] == 6 and kl_f["evidence"].startswith("6 models")
    html = (out / "report.html").read_text()
    assert "Rotation or rescaling?" in html and "Over training" in html and "RL from SFT checkpoints" in html
    assert "KL to the base and forgetting" in html and "Format shares over training" in html
    assert html.count("data:image/png;base64,") >= 9 and "Findings" in html and "http" not in html.split("<body>")[1][:200]
    for rel in ("config.yaml", "versions.json", "base/config.json", "methods/sft/model/model.safetensors",
                "methods/grpo/metrics.jsonl", "eval/base.json", "diagnostics/base__sft.json",
                "diagnostics/sft__grpo.json", "diagnostics/diff/tensors.parquet", "diagnostics/trajectory/trajectory.json"):
        assert (out / rel).exists(), rel
    # a second run reuses every stage and gives identical metrics (determinism + caching)
    r2 = cli("demo", "--preset", "quick", "--out", out)
    assert r2.returncode == 0 and "cached" in r2.stderr and "kl sft: cached" in r2.stderr
    res2 = json.loads((out / "results.json").read_text())
    assert res2["models"] == res["models"] and res2["kl_to_base"] == res["kl_to_base"]


@pytest.mark.slow
def test_quick_demo_is_deterministic_across_fresh_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        r = cli("demo", "--preset", "quick", "--out", out, "--set", "methods.grpo.steps=2", "--set", "methods.sft.steps=2")
        assert r.returncode == 0, r.stderr[-2000:]
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["models"] == rb["models"] and ra["diagnostics"] == rb["diagnostics"]
    assert (a / "methods/grpo/metrics.jsonl").read_text().splitlines()[-1].split('"step_seconds"')[0] == \
        (b / "methods/grpo/metrics.jsonl").read_text().splitlines()[-1].split('"step_seconds"')[0]


def test_eval_cli_takes_repeated_and_comma_separated_tasks(tiny_checkpoint, tmp_path):
    r = cli("eval", tiny_checkpoint, "--tasks", "points24/id", "--tasks", "facts,strings/id", "--out", tmp_path / "s.json",
            "--set", "eval.n_per_split=4", "--set", "eval.n_sampled_problems=0")
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "s.json").read_text())
    assert list(scores) == ["points24/id", "facts/id", "strings/id"]
    for key, v in scores.items():
        # the examples are the first five problems: with 4 of them, accuracy is their mean verdict
        n = len(v["examples"])
        assert v["n"] == n if key != "facts/id" else v["n"] > n
        if key != "facts/id":
            assert v["acc"] == sum(e["correct"] for e in v["examples"]) / n
