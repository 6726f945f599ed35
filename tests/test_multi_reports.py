"""The multi-seed and sweep reports and sweep.json, on made-up results (no study runs)."""

import json
import re

from posttrain.aggregate import aggregate_results
from posttrain.config import build_study_config, preset_path, read_study_yaml
from posttrain.io import atomic_write_json
from posttrain.report.html import write_report
from posttrain.sweep_summary import summarize_sweep


def seed_results(seed: int, grpo_id: float, grpo_eq: float, sft_holds: bool) -> dict:
    def model(id_acc, ood, facts, eq):
        return {"id_acc": id_acc, "ood_acc": ood, "retention": {"facts": facts}, "id_malformed": 0.1,
                "format_share": {"eq": eq, "steps": 0.9 - eq, "malformed": 0.1}}

    return {"study": "toy", "seed": seed, "wall_seconds": 5.0, "id_task": "points24/id", "ood_task": "points24/ood",
            "retention_tasks": ["facts/id"],
            "models": {"base": model(0.3, 0.2, 0.8, 0.6), "sft": model(0.5, 0.05, 0.6, 0.0),
                       "grpo": model(grpo_id, 0.18, 0.78, grpo_eq)},
            "forgetting": {"sft": 0.2, "grpo": 0.02 + 0.01 * seed},
            "diagnostics": {"sft": {"rel_update_total": 0.08}, "grpo": {"rel_update_total": 0.01 + 0.001 * seed}},
            "repairs": {"wise_alpha-0.5": {"id_acc": 0.4, "ood_acc": 0.1, "ood_recovered_frac": 0.3 + 0.1 * seed,
                                           "id_kept_frac": 0.5}},
            "findings": [{"id": "sft_forgets_more", "claim": "SFT forgets more.", "holds": sft_holds,
                          "evidence": f"seed {seed} numbers", "held_in": "1/1" if sft_holds else "0/1"}]}


def test_seeds_report_shows_mean_sd_points_and_held_in(tmp_path):
    per = {0: seed_results(0, 0.45, 0.8, True), 1: seed_results(1, 0.47, 0.85, True),
           2: seed_results(2, 0.40, 0.9, False)}
    for s, r in per.items():
        atomic_write_json(tmp_path / f"seed-{s}" / "results.json", r)
    atomic_write_json(tmp_path / "results.json", aggregate_results(per, {s: f"seed-{s}" for s in per}))
    page = write_report(tmp_path).read_text()
    assert "over 3 seeds" in page
    # grpo in-domain: mean 44.0, sd 3.6 (percent), per-seed points below
    assert "44.0 ± 3.6" in page and "45.0, 47.0, 40.0" in page
    row = re.search(r"SFT forgets more\..*?</tr>", page).group(0)
    assert "not established" in row and ">2/3<" in row  # seeds disagree: held in 2 of 3
    assert all(f'href="seed-{s}/report.html"' in page for s in per)
    assert "Per seed" in page and page.count("data:image/png;base64,") >= 1
    assert "ID gain kept" in page and "40.0 ± 10.0" in page  # OOD recovered 30/40/50%


def test_sweep_json_and_report_grid(tmp_path):
    cfg = build_study_config({**read_study_yaml(preset_path("quick")), "seeds": [0, 1],
                              "sweep": {"methods.grpo.kl_coef": [0.0, 0.1]}})
    cells = []
    for i, kl in enumerate((0.0, 0.1)):
        per = {0: seed_results(0, 0.45 - 0.1 * i, 0.8 - 0.3 * i, True), 1: seed_results(1, 0.47 - 0.1 * i, 0.9, i == 0)}
        name = f"kl_coef={kl}"
        agg = aggregate_results(per)
        atomic_write_json(tmp_path / "cells" / name / "results.json", agg)
        cells.append((name, {"methods.grpo.kl_coef": kl}, agg))
    sweep = summarize_sweep(cfg, cells, wall_seconds=12.0)
    assert sweep["kind"] == "sweep" and sweep["seeds"] == [0, 1] and [c["name"] for c in sweep["cells"]] == [
        "kl_coef=0.0", "kl_coef=0.1"]
    h0, h1 = (c["headline"] for c in sweep["cells"])
    assert h0["models"]["grpo"]["id_acc"]["values"] == [0.45, 0.47]
    assert h0["models"]["grpo"]["dominant_format"] == "eq" and h1["models"]["grpo"]["dominant_format"] == "eq"
    assert h1["models"]["grpo"]["format_share"]["eq"]["mean"] == 0.7
    assert h0["models"]["sft"]["dominant_format"] == "steps"  # malformed (0.1) never counts as a format
    assert h1["forgetting"]["grpo"]["values"] == [0.02, 0.03] and h0["rel_update"]["sft"]["mean"] == 0.08
    (f,) = sweep["findings"]
    assert f["cells"]["kl_coef=0.0"]["held_in"] == "2/2" and f["cells"]["kl_coef=0.1"]["held_in"] == "1/2"
    assert f["cells"]["kl_coef=0.1"]["holds"] is None
    atomic_write_json(tmp_path / "sweep.json", sweep)
    page = write_report(tmp_path).read_text()
    grid = page.split("Findings per cell")[1].split("Headline metrics")[0]
    assert "sft_forgets_more" in grid and "✓</span> 2/2" in grid and "–</span> 1/2" in grid
    assert 'href="cells/kl_coef=0.1/report.html"' in page and "Against methods.grpo.kl_coef" in page
    assert "<b>eq</b> 70.0 ± 28.3%" in page  # GRPO writes eq at kl 0.1: 50% and 90% of samples
    assert page.count("data:image/png;base64,") == 1
    json.dumps(sweep, allow_nan=False)  # strict JSON
