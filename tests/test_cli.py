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
    (["eval", "/nonexistent", "--tasks", "points24/id"], "cannot load model|not a Hugging Face"),
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
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--preset", "quick", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"base", "sft", "grpo"}
    for name, m in res["models"].items():
        # results.json carries the numbers of the evaluation stage, not others
        scores = json.loads((out / "eval" / f"{name}.json").read_text())
        assert m["id_acc"] == scores["points24/id"]["acc"] and m["ood_acc"] == scores["points24/ood"]["acc"]
        assert m["retention"] == {t: scores[f"{t}/id"]["acc"] for t in ("facts", "strings", "arith")}
        assert abs(sum(m["format_share"].values()) - 1) < 1e-6
    # forgetting is the mean retention drop from the base (positive = forgot)
    base_ret = res["models"]["base"]["retention"]
    assert set(res["forgetting"]) == {"sft", "grpo"}
    for name, f in res["forgetting"].items():
        ret = res["models"][name]["retention"]
        assert f == pytest.approx(sum(base_ret[t] - ret[t] for t in base_ret) / 3, abs=1e-12)
    for name in ("sft", "grpo"):
        d = res["diagnostics"][name]
        assert {"q_proj", "k_proj", "down_proj"} <= set(d["rel_update_by_module"])
        assert len(d["rel_update_by_layer"]) == 2
        # the study's diff is spectral: angles in degrees, angle curve over the spectrum
        assert 0 <= d["principal_angle_top"] <= 90 and d["sv_rel_change_top"] >= 0
        assert len(d["angle_curve"]["x"]) == len(d["angle_curve"]["left"]) > 0
        # checkpoint_every: 2 over 4 steps gives a two-point trajectory per method
        assert [p["step"] for p in res["trajectories"][name]] == [2, 4]
    cos = res["diagnostic_pairs"]["sft|grpo"]["cosine_total"]  # None when one update is exactly zero
    assert (cos is None) == (res["diagnostics"]["grpo"]["rel_update_total"] == 0) and (cos is None or -1 <= cos <= 1)
    # the findings are what the rules give on the numbers in results.json
    from posttrain.config import load_study_config
    from posttrain.report.findings import evaluate_findings

    findings = {f["id"]: f for f in res["findings"]}
    assert res["findings"] == evaluate_findings(res, load_study_config(out / "config.yaml"))
    assert {"sft_forgets_more", "rl_gains_id", "qk_change_most"} <= set(findings)
    forg, models = res["forgetting"], res["models"]
    assert findings["sft_forgets_more"]["holds"] == (forg["sft"] > forg["grpo"])
    assert findings["rl_forgets_little"]["holds"] == (forg["grpo"] < 0.05)
    assert findings["rl_gains_id"]["holds"] == (models["grpo"]["id_acc"] > models["base"]["id_acc"])
    assert all(f["evidence"] for f in res["findings"])
    html = (out / "report.html").read_text()
    assert "Rotation or rescaling?" in html and "Over training" in html
    assert html.count("data:image/png;base64,") >= 8 and "Findings" in html and "http" not in html.split("<body>")[1][:200]
    for rel in ("config.yaml", "versions.json", "base/config.json", "methods/sft/model/model.safetensors",
                "methods/grpo/metrics.jsonl", "eval/base.json", "diagnostics/base__sft.json",
                "diagnostics/sft__grpo.json", "diagnostics/diff/tensors.parquet", "diagnostics/trajectory/trajectory.json"):
        assert (out / rel).exists(), rel
    # a second run reuses every stage and gives identical metrics (determinism + caching)
    r2 = cli("demo", "--preset", "quick", "--out", out)
    assert r2.returncode == 0 and "cached" in r2.stderr
    res2 = json.loads((out / "results.json").read_text())
    assert res2["models"] == res["models"]


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
