"""Sweeps (posttrain/study_sweep.py): planning and validation of the cells, the directory layouts,
and multi-seed studies and sweeps end to end on the quick preset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import build_study_config, preset_path, read_study_yaml
from posttrain.errors import UserError
from posttrain.multiseed import claim_root
from posttrain.study_sweep import axis_labels, cell_name, plan_sweep, set_dotted

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "posttrain" / "presets" / "quick.yaml"


def quick(**extra):
    return build_study_config({**read_study_yaml(preset_path("quick")), **extra})


def test_plan_crosses_axes_with_list_indices_and_linked_paths():
    cfg = quick(sweep={"model.hidden_size": [32, 64], "pretrain.mixture.0.formats.eq": [0.2, 0.8],
                       "methods.sft.lr+methods.grpo.lr": [1.0e-4]})
    cells = plan_sweep(cfg)
    assert [c.name for c in cells] == [
        "hidden_size=32,eq=0.2,lr=0.0001", "hidden_size=32,eq=0.8,lr=0.0001",
        "hidden_size=64,eq=0.2,lr=0.0001", "hidden_size=64,eq=0.8,lr=0.0001"]
    last = cells[-1].cfg
    assert last.model.hidden_size == 64 and last.pretrain.mixture[0].formats["eq"] == 0.8
    assert last.pretrain.mixture[0].formats["steps"] == 0.35  # the rest of the entry is kept
    assert last.methods["sft"].lr == last.methods["grpo"].lr == 1.0e-4
    assert last.sweep is None and cells[0].cfg.model.hidden_size == 32
    assert cells[0].values == {"model.hidden_size": 32, "pretrain.mixture.0.formats.eq": 0.2,
                               "methods.sft.lr+methods.grpo.lr": 1.0e-4}


def test_plan_sets_a_method_knob_not_written_in_the_config():
    cells = plan_sweep(quick(sweep={"methods.grpo.kl_coef": [0.0, 0.01]}))
    assert [c.cfg.methods["grpo"].kl_coef for c in cells] == [0.0, 0.01]
    assert [c.name for c in cells] == ["kl_coef=0.0", "kl_coef=0.01"]


@pytest.mark.parametrize("axes,match", [
    ({"model.hidden_size": [33]}, r"axis 'model.hidden_size' = 33 .*not divisible by num_heads"),
    ({"model.hiden_size": [64]}, r"axis 'model.hiden_size' = 64 .*hiden_size"),
    ({"methods.ppo.kl_coef": [0.1]}, r"sweep axis 'methods.ppo.kl_coef': methods has no section 'ppo' \(has: sft, grpo, sft_long, grpo_from_sft, grpo_from_peak, grpo_from_long\)"),
    ({"pretrain.mixture.9.weight": [1.0]}, r"pretrain.mixture is a list of 5; '9' is not an index"),
    ({"methods.grpo.kl_coef": [-1.0]}, r"axis 'methods.grpo.kl_coef' = -1.0 .*kl_coef"),
    ({"seed": [0, 1]}, r"seed cannot be swept \(list the seeds under `seeds:`"),
    ({"methods.sft.lr": [1e-4, 1e-4]}, r"lists the value 0.0001 twice"),
    ({"model.hidden_size.x": [1]}, r"model.hidden_size is a value, not a section"),
])
def test_plan_rejects_bad_axes_in_one_line_naming_the_axis(axes, match):
    with pytest.raises(UserError, match=match) as e:
        plan_sweep(quick(sweep=axes))
    assert "\n" not in str(e.value)


def test_sweep_and_seeds_shape_is_validated_by_the_config():
    for bad, match in (({"sweep": {}}, "names no axis"), ({"sweep": {"model.hidden_size": []}}, "has no values"),
                       ({"seeds": [0, 0]}, "distinct"), ({"seeds": []}, "empty")):
        with pytest.raises(UserError, match=match):
            quick(**bad)


def test_labels_and_names_are_short_distinct_and_filesystem_safe():
    assert axis_labels(["methods.sft.lr", "methods.grpo.lr", "model.hidden_size"]) == {
        "methods.sft.lr": "sft.lr", "methods.grpo.lr": "grpo.lr", "model.hidden_size": "hidden_size"}
    name = cell_name({"a.b": "x/y z", "c": {"k": [1, 2]}}, {"a.b": "b", "c": "c"})
    assert name == "b=x_y_z,c=k-1_2"
    assert cell_name({"f": {"eq": 0.8, "steps": 0.2}}, {"f": "formats"}) == "formats=eq-0.8_steps-0.2"
    long = cell_name({"a": "v" * 300}, {"a": "a"})
    assert len(long) <= 120 and long != cell_name({"a": "v" * 299}, {"a": "a"})
    # values that read alike once sanitised still get distinct directories
    cells = plan_sweep(quick(sweep={"methods.sft.trackers": [["a/b"], ["a b"]]}))
    assert [c.name for c in cells] == ["trackers=a_b", "trackers=a_b-2"]


def test_set_dotted_sets_indices_and_merges_sections():
    data = {"a": [{"b": 1, "c": {"x": 1, "y": 2}}], "c": 2}
    set_dotted(data, "a.0.b", 5)
    set_dotted(data, "a.0.c", {"y": 3})
    set_dotted(data, "c", {"z": 1})  # a mapping replaces a value
    assert data == {"a": [{"b": 5, "c": {"x": 1, "y": 3}}], "c": {"z": 1}}
    cells = plan_sweep(quick(sweep={"model": [{"hidden_size": 16, "intermediate_size": 48}]}))
    m = cells[0].cfg.model
    assert (m.hidden_size, m.intermediate_size, m.num_layers, m.max_length) == (16, 48, 2, 96)
    assert cells[0].name == "model=hidden_size-16_intermediate_size-48"
    with pytest.raises(UserError, match="not a dotted config path"):
        set_dotted(data, "a..b", 1)


def test_layouts_do_not_turn_into_each_other(tmp_path):
    single = tmp_path / "single"
    (single / ".stages").mkdir(parents=True)
    with pytest.raises(UserError, match="exists and is not empty; pass --resume"):
        claim_root(single, "single", resume=False)
    with pytest.raises(UserError, match="holds a single-seed study, not a multi-seed study"):
        claim_root(single, "seeds", resume=True)
    claim_root(single, "single", resume=True)
    multi = tmp_path / "multi"
    (multi / "seed-0").mkdir(parents=True)
    with pytest.raises(UserError, match="holds a multi-seed study, not a sweep"):
        claim_root(multi, "sweep", resume=True)
    claim_root(tmp_path / "fresh", "sweep", resume=False)
    assert (tmp_path / "fresh").is_dir()


# ---- end to end ----------------------------------------------------------------------------------

def cli(*args):
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=3600)


# the quick preset made quicker (the machine running the suite may be shared); every stage still runs
def strip_volatile(x):
    """A results.json section without what differs between two runs of the same study (caching, timing)."""
    if isinstance(x, dict):
        return {k: strip_volatile(v) for k, v in x.items() if k not in ("cached", "wall_seconds", "step_seconds")}
    if isinstance(x, list):
        return [strip_volatile(v) for v in x]
    return x


# (SFT keeps its step-2 checkpoint: RL from its peak-OOD checkpoint needs one)
FAST = ["--set", "methods.sft.steps=2", "--set", "methods.grpo.steps=2", "--set", "methods.sft.checkpoint_every=2",
        "--set", "methods.grpo.checkpoint_every=0", "--set", "pretrain.steps=20", "--set", "eval.n_sampled_problems=4",
        "--set", "repair.grid=[{method: reset_layers, first_frac: 0.5}]"]


@pytest.mark.slow
def test_quick_study_over_two_seeds(tmp_path):
    out = tmp_path / "D"
    r = cli("study", QUICK, "--seeds", "0,1", "--out", out, "--jobs", "2", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 seeds in 2 processes" in r.stderr
    per = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    # a seed run in a side process (1 thread) is the seed run alone in this one (default threads)
    alone = tmp_path / "alone"
    r1 = cli("study", QUICK, "--seed", "1", "--out", alone, *FAST)
    assert r1.returncode == 0, r1.stderr[-3000:]
    solo = json.loads((alone / "results.json").read_text())
    for key in ("models", "forgetting", "diagnostics", "trajectories", "repairs", "findings"):
        assert strip_volatile(solo[key]) == strip_volatile(per[1][key]), key
    assert per[0]["seed"] == 0 and per[1]["seed"] == 1 and (out / "seed-0" / "report.html").is_file()
    assert per[0]["models"]["base"]["id_acc"] != per[1]["models"]["base"]["id_acc"] or \
        per[0]["diagnostics"] != per[1]["diagnostics"]  # two different seeds, two different runs
    agg = json.loads((out / "results.json").read_text())
    assert agg["kind"] == "seeds" and agg["seeds"] == [0, 1] and agg["runs"] == {"0": "seed-0", "1": "seed-1"}
    for model in ("base", "sft", "grpo"):
        node = agg["models"][model]["id_acc"]
        assert set(node) == {"mean", "sd", "ci95", "values"}
        assert node["values"] == [per[0]["models"][model]["id_acc"], per[1]["models"][model]["id_acc"]]
        lo, hi = node["ci95"]
        assert lo <= node["mean"] <= hi
        assert agg["models"][model]["retention"]["facts"]["values"][1] == per[1]["models"][model]["retention"]["facts"]
    assert agg["forgetting"]["sft"]["values"] == [per[0]["forgetting"]["sft"], per[1]["forgetting"]["sft"]]
    assert agg["diagnostics"]["grpo"]["rel_update_total"]["values"] == [
        per[s]["diagnostics"]["grpo"]["rel_update_total"] for s in (0, 1)]
    rep = next(iter(agg["repairs"]))
    assert agg["repairs"][rep]["ood_acc"]["values"] == [per[s]["repairs"][rep]["ood_acc"] for s in (0, 1)]
    assert agg["findings"] and all(f["held_in"].endswith("/2") for f in agg["findings"])
    for f in agg["findings"]:
        k = sum(1 for s in (0, 1) for g in per[s]["findings"] if g["id"] == f["id"] and g["holds"] is True)
        assert f["held_in"] == f"{k}/2"
    page = (out / "report.html").read_text()
    assert "over 2 seeds" in page and 'href="seed-1/report.html"' in page and "held in" in page
    assert page.count("data:image/png;base64,") >= 2
    # rerun: every stage cached, the same numbers; a single-seed run cannot reuse this directory
    r2 = cli("study", QUICK, "--seeds", "0,1", "--out", out, "--resume", "--jobs", "1", *FAST)
    assert r2.returncode == 0 and "[seed 1] pretrain: cached" in r2.stderr and "[seed 1] train grpo: cached" in r2.stderr
    assert json.loads((out / "results.json").read_text())["models"] == agg["models"]
    r3 = cli("study", QUICK, "--out", out, "--resume", *FAST)
    assert r3.returncode == 2 and "holds a multi-seed study" in r3.stderr
    r4 = cli("study", QUICK, "--seeds", "0,1", "--out", out, *FAST)
    assert r4.returncode == 2 and "pass --resume" in r4.stderr


def test_cli_rejects_bad_seeds_and_sweeps_before_running(tmp_path):
    r = cli("study", QUICK, "--seeds", "0,1", "--seed", "3")
    assert r.returncode == 2 and "--seed and --seeds exclude each other" in r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"extends: {QUICK}\nsweep:\n  methods.grpo.kl_coef: [0.0, 0.01]\n  model.num_heads: [2, 5]\n")
    r = cli("study", cfg, "--out", tmp_path / "out")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: sweep axis 'model.num_heads' = 5 (cell kl_coef=0.0,num_heads=5)"), lines[0]
    assert not (tmp_path / "out").exists()  # every cell is checked before anything runs
    from posttrain.cli import _seed_overrides

    with pytest.raises(UserError, match="comma-separated integers"):
        _seed_overrides(None, "0,x")
    assert _seed_overrides(None, "0, 2") == ["seeds=[0, 2]"] and _seed_overrides(3, None) == ["seed=3"]


@pytest.mark.slow
def test_two_cell_sweep_end_to_end(tmp_path):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"extends: {QUICK}\nname: kl\nsweep:\n  methods.grpo.kl_coef: [0.0, 0.05]\n")
    out = tmp_path / "S"
    r = cli("study", cfg, "--out", out, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    names = ["kl_coef=0.0", "kl_coef=0.05"]
    for n in names:
        assert (out / "cells" / n / "results.json").is_file() and (out / "cells" / n / "report.html").is_file()
    # the second cell's base is pretrained identically: it starts from a copy of the first one's
    assert "[kl_coef=0.05] pretrain: cached" in r.stderr
    a, b = (out / "cells" / n / "base" / "model.safetensors" for n in names)
    assert a.read_bytes() == b.read_bytes()
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["kind"] == "sweep" and [c["name"] for c in sweep["cells"]] == names
    assert sweep["axes"] == {"methods.grpo.kl_coef": [0.0, 0.05]}
    cells = {n: json.loads((out / "cells" / n / "results.json").read_text()) for n in names}
    assert cells[names[1]]["training"]["grpo"]  # the cell ran its own GRPO
    for c in sweep["cells"]:
        assert c["headline"]["models"]["grpo"]["id_acc"]["values"] == [cells[c["name"]]["models"]["grpo"]["id_acc"]]
        assert c["headline"]["forgetting"]["sft"]["mean"] == pytest.approx(cells[c["name"]]["forgetting"]["sft"])
    for f in sweep["findings"]:
        assert set(f["cells"]) == set(names)
        for n in names:
            own = next(g for g in cells[n]["findings"] if g["id"] == f["id"])
            assert f["cells"][n]["holds"] == own["holds"] and f["cells"][n]["held_in"] == own["held_in"]
    page = (out / "report.html").read_text()
    assert "Findings per cell" in page and 'href="cells/kl_coef=0.05/report.html"' in page
    grid = page.split("Findings per cell")[1].split("Headline metrics")[0]
    assert grid.count("<tr>") == len(sweep["findings"]) + 1 and grid.count("/1</td>") == 2 * len(sweep["findings"])
    assert "Against methods.grpo.kl_coef" in page and page.count("data:image/png;base64,") >= 1


def test_seed_jobs_follow_the_config_and_the_cores(monkeypatch):
    from posttrain import multiseed

    monkeypatch.setattr(multiseed, "cpu_cores", lambda: 2)
    three = quick(seeds=[0, 1, 2])
    assert multiseed.seed_jobs(three, "cpu") == 3 and multiseed.threads_per_job(3) == 1
    assert multiseed.seed_jobs(quick(seeds=list(range(6))), "cpu") == 4 and multiseed.threads_per_job(2) == 1
    assert multiseed.seed_jobs(quick(seeds=[4]), "cpu") == 1  # one seed: no side process
    assert multiseed.seed_jobs(quick(seeds=[0, 1, 2], jobs=1), "cpu") == 1
    assert multiseed.seed_jobs(quick(seeds=[0, 1, 2], jobs=8), "cpu") == 3  # never more processes than seeds
    monkeypatch.setattr(multiseed, "cpu_cores", lambda: 16)
    assert multiseed.seed_jobs(three, "cpu") == 3 and multiseed.threads_per_job(3) == 5
    with pytest.raises(Exception, match="jobs must be a positive number"):
        quick(seeds=[0, 1], jobs=0)
