"""Retention through lm-evaluation-harness: a local multiple-choice task on the tiny model, offline."""

import json
import math
import random

import pytest
import torch

from posttrain.config import LmEvalRef, build_study_config
from posttrain.errors import UserError
from posttrain.evaluation.lm_eval_bridge import evaluate_lm_eval, evaluate_lm_eval_refs, pick_metric

N_ITEMS = 12


def _items() -> list[dict]:
    """MMLU-style rows (question, four choices, index of the right one), ASCII without newlines:
    the tiny model's character tokenizer has no newline token."""
    rng = random.Random(0)
    rows = []
    for _ in range(N_ITEMS):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        choices = [str(a + b), str(a + b + 1), str(a * b), f"{a}{b}0"]  # different lengths: acc_norm != acc
        rng.shuffle(choices)
        rows.append({"question": f"What is {a}+{b}?", "choices": choices, "answer": choices.index(str(a + b))})
    return rows


MMLU_STYLE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} A. {{{{choices[0]}}}} B. {{{{choices[1]}}}} C. {{{{choices[2]}}}} D. {{{{choices[3]}}}} Answer:"
doc_to_choice: {choices}
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """tasks/ with `tiny_mmlu` (answer letters) and `tiny_arc` (answer texts) over one local JSONL."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "data" / "tiny_mmlu.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in _items()))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mmlu.yaml").write_text(MMLU_STYLE.format(name="tiny_mmlu", data=data, choices='["A", "B", "C", "D"]'))
    (tasks / "tiny_arc.yaml").write_text(MMLU_STYLE.format(name="tiny_arc", data=data, choices='"{{choices}}"'))
    return tasks


def _context(row: dict) -> str:
    c = row["choices"]
    return f"{row['question']} A. {c[0]} B. {c[1]} C. {c[2]} D. {c[3]} Answer:"


@torch.no_grad()
def _choice_logliks(model, tok, row: dict, letters: bool) -> list[float]:
    """Our own scoring of one item: sum of log p(token | prefix) over the tokens of " <choice>"
    after the prompt, for each choice (one right-padded batch; padding sits after every scored token)."""
    ctx = tok(_context(row), add_special_tokens=False)["input_ids"]
    conts = [tok(" " + ("ABCD"[i] if letters else c), add_special_tokens=False)["input_ids"]
             for i, c in enumerate(row["choices"])]
    width = len(ctx) + max(map(len, conts))
    ids = torch.tensor([ctx + c + [tok.pad_token_id] * (width - len(ctx) - len(c)) for c in conts])
    logp = torch.log_softmax(model(ids).logits.double(), -1)
    return [sum(logp[b, len(ctx) - 1 + j, t].item() for j, t in enumerate(c)) for b, c in enumerate(conts)]


def _direct_hits(model, tok, rows: list[dict], letters: bool, norm: bool = False) -> list[bool]:
    """Per item: is the argmax choice (log-likelihood, divided by the choice's length in characters
    for acc_norm) the right one."""
    hits = []
    for row in rows:
        ll = _choice_logliks(model, tok, row, letters)
        texts = ["ABCD"[i] if letters else c for i, c in enumerate(row["choices"])]
        scores = [v / len(t) if norm else v for v, t in zip(ll, texts)]
        hits.append(max(range(4), key=lambda i: scores[i]) == row["answer"])
    return hits


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from posttrain.models.loading import load_model

    return load_model(tiny_checkpoint)


def test_bridge_score_equals_direct_loglikelihood_scoring(tiny, local_tasks):
    model, tok = tiny
    rows = _items()
    ref = LmEvalRef(lm_eval="tiny_mmlu", include_path=str(local_tasks), batch_size=5)
    full = evaluate_lm_eval(model, tok, ref, seed=0)
    assert full["metric"] == "acc,none" and full["n"] == N_ITEMS and 0 <= full["acc"] <= 1
    hits = _direct_hits(model, tok, rows, letters=True)
    assert full["acc"] == pytest.approx(sum(hits) / N_ITEMS, abs=1e-12)
    # the first items one by one: the score follows each item, not just the average
    for k in (1, 2, 3):
        part = evaluate_lm_eval(model, tok, ref.model_copy(update={"limit": k}), seed=0)
        assert part["n"] == k and part["acc"] == pytest.approx(sum(hits[:k]) / k, abs=1e-12)
    # answers as texts of different lengths: acc and the length-normalised acc_norm are both ours
    arc = LmEvalRef(lm_eval="tiny_arc", include_path=str(local_tasks))
    got = evaluate_lm_eval_refs(model, tok, [arc, arc.model_copy(update={"metric": "acc_norm", "num_fewshot": 0})], 0)
    acc, acc_norm = got["lm_eval:tiny_arc"], got["lm_eval:tiny_arc:0shot"]
    assert acc["acc"] == pytest.approx(sum(_direct_hits(model, tok, rows, letters=False)) / N_ITEMS, abs=1e-12)
    assert acc_norm["metric"] == "acc_norm,none"
    assert acc_norm["acc"] == pytest.approx(sum(_direct_hits(model, tok, rows, False, norm=True)) / N_ITEMS, abs=1e-12)


def test_bridge_is_deterministic_and_leaves_the_callers_rng_alone(tiny, local_tasks):
    model, tok = tiny
    ref = LmEvalRef(lm_eval="tiny_mmlu", include_path=str(local_tasks), limit=4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = evaluate_lm_eval(model, tok, ref, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert evaluate_lm_eval(model, tok, ref, seed=0) == a


def test_local_tasks_never_reach_the_hub(tiny, local_tasks, tmp_path):
    model, tok = tiny
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "missing.yaml").write_text(MMLU_STYLE.format(name="missing", data=tmp_path / "nope.jsonl", choices="[A, B]"))
    (tasks / "hub.yaml").write_text(MMLU_STYLE.format(name="hub", data="x", choices="[A, B]").replace(
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x\n", "dataset_path: cais/mmlu\ndataset_name: anatomy\n"))
    with pytest.raises(UserError, match=r"'missing'.*hub off.*nope\.jsonl") as e:
        evaluate_lm_eval(model, tok, LmEvalRef(lm_eval="missing", include_path=str(tasks)), seed=0)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"'hub'.*hub off.*cannot load") as e:
        evaluate_lm_eval(model, tok, LmEvalRef(lm_eval="hub", include_path=str(tasks)), seed=0)
    assert "\n" not in str(e.value)
    import datasets.config
    import huggingface_hub.constants

    # the switch is restored: the process's own settings are untouched afterwards
    assert datasets.config.HF_HUB_OFFLINE == huggingface_hub.constants.HF_HUB_OFFLINE


def test_pick_metric():
    row = {"alias": "t", "acc,none": 0.25, "acc_stderr,none": "N/A", "acc_norm,none": 0.5,
           "exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.3}
    assert pick_metric(row, None, "t") == ("acc,none", 0.25)
    assert pick_metric(row, "acc_norm", "t") == ("acc_norm,none", 0.5)
    assert pick_metric(row, "exact_match", "t") == ("exact_match,strict-match", 0.1)
    assert pick_metric(row, "exact_match,flexible-extract", "t") == ("exact_match,flexible-extract", 0.3)
    with pytest.raises(UserError, match="no metric 'f1'.*acc,none"):
        pick_metric(row, "f1", "t")
    with pytest.raises(UserError, match="not a finite number"):
        pick_metric({"acc,none": math.nan}, None, "t")
    with pytest.raises(UserError, match="reports no score"):
        pick_metric({"alias": "g"}, None, "g")


@pytest.mark.parametrize("entry, match", [
    ({"lm_eval": "tiny_mmlu", "include_path": "/no/such/dir"}, r"retention\.1\.lm_eval: .*'/no/such/dir' is not a directory"),
    ({"lm_eval": "tiny_mmlu", "limt": 3}, r"retention\.1\.lm_eval\.limt: Extra inputs"),
    ({"lm_eval": "tiny_mmlu", "limit": 0}, "limit must be a count >= 1 or a fraction"),
    ({"lm_eval": "tiny_mmlu", "limit": 1.5}, "limit must be a count >= 1 or a fraction"),
    ({"lm_eval": "tiny_mmlu", "num_fewshot": -1}, "num_fewshot"),
])
def test_bad_lm_eval_entries_are_one_line_errors(entry, match, local_tasks):
    entry = {"include_path": str(local_tasks), **entry}
    with pytest.raises(UserError, match=match) as e:
        build_study_config({"retention": [{"task": "facts"}, entry]})
    assert "\n" not in str(e.value)


def test_duplicate_lm_eval_entry_is_an_error(local_tasks):
    e = {"lm_eval": "tiny_mmlu", "include_path": str(local_tasks)}
    with pytest.raises(UserError, match="retention lists 'lm_eval:tiny_mmlu' twice"):
        build_study_config({"retention": [e, {**e, "limit": 3}]})
    cfg = build_study_config({"retention": [{"task": "facts"}, e, {**e, "num_fewshot": 1}]})
    assert [r.key for r in cfg.lm_eval_retention] == ["lm_eval:tiny_mmlu", "lm_eval:tiny_mmlu:1shot"]
    assert [r.key for r in cfg.task_retention] == ["facts/id"]
    # the resolved config round-trips (config.yaml of a run is re-read on resume)
    assert build_study_config(cfg.model_dump(mode="json")) == cfg


@pytest.mark.slow  # indexes lm-eval's ~15k built-in task files once (10-15 s)
def test_unknown_lm_eval_task_names_are_caught_offline(local_tasks):
    with pytest.raises(UserError, match=r"unknown lm_eval task 'mmlu_nope'.*close: ") as e:
        build_study_config({"retention": [{"lm_eval": "mmlu_nope"}]})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"unknown lm_eval task 'tiny_mmluu'.*nor under include_path"):
        build_study_config({"retention": [{"lm_eval": "tiny_mmluu", "include_path": str(local_tasks)}]})
    cfg = build_study_config({"retention": [{"lm_eval": "mmlu", "limit": 500}, {"lm_eval": "gpqa_diamond_zeroshot"}]})
    assert [r.key for r in cfg.retention] == ["lm_eval:mmlu", "lm_eval:gpqa_diamond_zeroshot"]


def test_results_name_lm_eval_retention_and_count_it_in_forgetting(local_tasks):
    from posttrain.results import forgetting, model_entry

    e = {"lm_eval": "tiny_mmlu", "include_path": str(local_tasks)}
    cfg = build_study_config({"retention": [{"task": "facts"}, e, {**e, "num_fewshot": 2}]})

    def scores(facts, zero, two):
        split = {"acc": 0.5, "malformed": 0.0, "format_share": {"eq": 1.0}}
        return {"points24/id": split, "points24/ood": split, "facts/id": {"acc": facts},
                "lm_eval:tiny_mmlu": {"acc": zero}, "lm_eval:tiny_mmlu:2shot": {"acc": two}}

    base, ft = model_entry(cfg, scores(0.9, 0.5, 0.6)), model_entry(cfg, scores(0.6, 0.5, 0.3))
    # two entries share a task name, so both go by their keys
    assert base["retention"] == {"facts": 0.9, "lm_eval:tiny_mmlu": 0.5, "lm_eval:tiny_mmlu:2shot": 0.6}
    assert forgetting(base, ft) == pytest.approx((0.3 + 0.0 + 0.3) / 3)
    one = build_study_config({"retention": [{"task": "facts"}, e]})
    assert model_entry(one, scores(0.9, 0.5, 0.6))["retention"] == {"facts": 0.9, "tiny_mmlu": 0.5}


@pytest.mark.slow  # a whole (tiny) study: base eval, 2 SFT steps, eval, diff, report
def test_study_stores_lm_eval_retention_and_counts_it_in_forgetting(tiny_checkpoint, local_tasks, tmp_path):
    from posttrain.models.loading import load_model
    from posttrain.study import run_study

    entry = {"lm_eval": "tiny_mmlu", "include_path": str(local_tasks), "limit": 8}
    cfg = build_study_config({
        "base_model": str(tiny_checkpoint),
        "world": {"facts": {"n_entities": 6}},
        "retention": [{"task": "facts"}, entry],
        "methods": {"sft": {"objective": "sft", "steps": 2, "prompts_per_step": 2, "samples_per_prompt": 1,
                            "lr": 0.05}},
        "eval": {"n_per_split": 4, "n_sampled_problems": 0, "max_new_tokens": 8},
        "diagnostics": {"spectral": False, "trajectory": False},
        "repair": {"damaged": None},
    })
    res = run_study(cfg, tmp_path / "run", device="cpu", log=lambda msg: None)
    assert res["retention_tasks"] == ["facts/id", "lm_eval:tiny_mmlu"]
    base, sft = res["models"]["base"]["retention"], res["models"]["sft"]["retention"]
    assert set(base) == set(sft) == {"facts", "tiny_mmlu"}
    # the stored score is the bridge's score of that model
    for name, ret in (("base", base), ("sft", sft)):
        model, tok = load_model(tiny_checkpoint if name == "base" else tmp_path / "run/methods/sft/model")
        direct = evaluate_lm_eval(model, tok, LmEvalRef(**entry), seed=cfg.seed)
        assert ret["tiny_mmlu"] == direct["acc"]
        stored = json.loads((tmp_path / f"run/eval/{name}.json").read_text())["lm_eval:tiny_mmlu"]
        assert stored["acc"] == direct["acc"] and stored["n"] == 8
    assert res["forgetting"]["sft"] == pytest.approx(((base["facts"] - sft["facts"]) + (base["tiny_mmlu"] - sft["tiny_mmlu"])) / 2)
