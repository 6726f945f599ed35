"""Dataset tasks declared in YAML: verifiers, format labels, splits, sampling, bad specs, and the
task in `posttrain eval` and the training loop. Small JSONL files written here stand in for GSM8K
and MATH (ASCII only: the tiny model's tokenizer knows nothing else)."""

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import TrainConfig, build_study_config
from posttrain.errors import UserError
from posttrain.tasks.dataset import DatasetTask, last_match
from posttrain.tasks.spec import load_task_spec, spec_name, validate_spec
from posttrain.tasks.verifiers import Countdown, Exact, MathVerify, Numeric, Regex, close_enough, read_number

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "configs" / "tasks"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def gsm_rows(start: int, n: int) -> list[dict]:
    return [{"question": f"What is {a} plus {a + 3}?", "answer": f"{a}+{a + 3}={2 * a + 3} #### {2 * a + 3}"}
            for a in range(start, start + n)]


@pytest.fixture
def gsm_files(tmp_path):
    return {"train": write_jsonl(tmp_path / "gsm_train.jsonl", gsm_rows(1, 12)),
            "test": write_jsonl(tmp_path / "gsm_test.jsonl", gsm_rows(100, 6))}


def math_rows() -> list[dict]:
    rows = []
    for i in range(20):
        level = i % 5 + 1
        rows.append({"problem": f"Problem {i}: halve {i + 1}.", "level": level,
                     "solution": f"Halving gives \\boxed{{\\frac{{{i + 1}}}{{2}}}}", "answer": f"\\frac{{{i + 1}}}{{2}}"})
    return rows


@pytest.fixture
def math_file(tmp_path):
    return write_jsonl(tmp_path / "math.jsonl", math_rows())


def gsm_task(files, **over) -> DatasetTask:
    over = {"source": {"data_files": files}, "prompt": "Q: {question} A:", **over}
    return DatasetTask("gsm8k", load_task_spec(TASKS / "gsm8k.yaml", over))


def math_task(path, **over) -> DatasetTask:
    return DatasetTask("math500", load_task_spec(TASKS / "math500.yaml", {"source": {"data_files": {"test": path}}, **over}))


def check(verifier, got, gold=None, row=None, whole=False):
    return verifier.check(got, gold, row or {}, whole=whole)


# -- verifiers on hand cases -------------------------------------------------------------------

def test_math_verify_hand_cases():
    mv = MathVerify(type="math_verify")
    assert check(mv, "42", "42") is True
    assert check(mv, "41", "42") is False  # a near miss is wrong, not malformed
    assert check(mv, "1000", "1,000") is True
    assert check(mv, "\\boxed{\\frac{1}{2}}", "0.5") is True
    assert check(mv, "0.5", "\\frac{1}{2}") is True
    assert check(mv, "0.51", "\\frac{1}{2}") is False
    assert check(mv, "Adding them, the answer is 42.", "42", whole=True) is True
    assert check(mv, "so it is \\boxed{41}", "42", whole=True) is False
    assert check(mv, "no idea", "42", whole=True) is None


def test_exact_regex_numeric_hand_cases():
    ex = Exact(type="exact", lower=True, remove=",")
    assert check(ex, " Paris ", "paris") is True
    assert check(ex, "1,000", "1000") is True
    assert check(ex, "Lyon", "paris") is False
    assert check(ex, "   ", "paris") is None
    assert check(Exact(type="exact"), "Paris", "paris") is False  # no case folding unless asked
    rx = Regex(type="regex", pattern=r"(?:answer: )?{answer}\.?")
    assert check(rx, "answer: a+b.", "a+b") is True
    assert check(rx, "aab", "a+b") is False  # the reference is matched literally, not as a regex
    assert check(Regex(type="regex", pattern="{answer}", fullmatch=False), "it is a+b!", "a+b") is True
    assert check(Regex(type="regex", pattern="{unit} {answer}"), "kg 5", "5", {"unit": "kg"}) is True
    num = Numeric(type="numeric")
    assert check(num, "42.0000001", "42") is True  # |d| = 1e-7 <= abs_tol 1e-6
    assert check(num, "42.00001", "42") is False
    assert check(num, "41", "42") is False
    assert check(num, "1,000", "1000") is True
    assert check(num, "3/4", "0.75") is True
    assert check(num, "4 2", "42") is None and check(num, "1,00", "100") is None
    rel = Numeric(type="numeric", abs_tol=0, rel_tol=0.01)
    assert check(rel, "101", "100") is True and check(rel, "102", "100") is False


def test_number_reading_and_tolerance_by_hand():
    assert read_number("-3.5") == Fraction(-7, 2) and read_number("2e3") == 2000 and read_number("1,234,567") == 1234567
    assert read_number("12,34") is None and read_number("1/0") is None and read_number("") is None
    # |got - ref| <= abs_tol + rel_tol * |ref|: 10.5 vs 10 with 0.1 + 0.04 * 10 = 0.5 is exactly inside
    assert close_enough(Fraction(21, 2), Fraction(10), 0.1, 0.04)
    assert not close_enough(Fraction(1051, 100), Fraction(10), 0.1, 0.04)


def test_countdown_verifier_uses_each_number_once():
    cd = Countdown(type="countdown")
    row = {"nums": [3, 5, 7], "target": 22}
    assert check(cd, "3*5+7", row=row) is True
    assert check(cd, " 3 * 5 + 7 = 22 ", row=row) is True
    assert check(cd, "3*5+7=23", row=row) is False  # states the wrong result
    assert check(cd, "3*5+8", row=row) is False  # a number not given
    assert check(cd, "3*5+7+7-7", row=row) is False  # 7 used three times
    assert check(cd, "3*7+1", row=row) is False  # 5 unused, 1 not given
    assert check(cd, "(7+5)*3", row=row) is False  # uses each once but equals 36
    assert check(cd, "3*5+7=", row=row) is None
    assert check(cd, "x+1", row=row) is None
    with pytest.raises(ValueError, match="not a list of integers"):
        check(cd, "1", row={"nums": "3 5", "target": 8})


# -- the task: formats, answers, splits, sampling -------------------------------------------------

def test_reference_answer_extraction_and_verdicts(gsm_files):
    task = gsm_task(gsm_files)
    p = task.sample(random.Random(0), "id", "train")
    a = int(p.prompt.split()[3])
    assert p.prompt == f"Q: What is {a} plus {a + 3}? A:" and p.data["answer"] == str(2 * a + 3)
    demo = task.solve(p, "hash")
    assert demo == f"{a}+{a + 3}={2 * a + 3} #### {2 * a + 3}"
    v = task.verify(p, demo)
    assert v.correct and not v.malformed and v.format == "hash"
    v = task.verify(p, f"#### {2 * a + 2}")
    assert not v.correct and not v.malformed and v.format == "hash"
    v = task.verify(p, f"so \\boxed{{{2 * a + 3}}}")
    assert v.correct and v.format == "boxed"
    assert task.verify(p, "no digits here").malformed
    with pytest.raises(UserError, match="reference solutions in format.*hash.*not 'boxed'"):
        task.solve(p, "boxed")
    assert last_match(r"#+ (\d+)", "## 1 ## 2") == "2"


def test_format_labels_first_match_wins_and_default(gsm_files):
    task = gsm_task(gsm_files)
    assert task.formats == ("hash", "boxed", "plain") and task.solution_formats == ("hash",)
    assert task.classify("\\boxed{3} #### 3") == "hash"  # both match: the earlier format wins
    assert task.classify("\\boxed{3}") == "boxed"
    assert task.classify("three") is None
    loose = gsm_task(gsm_files, default_format="other")
    assert loose.formats == ("hash", "boxed", "plain", "other")
    assert loose.classify("three") == "other"
    p = loose.sample(random.Random(0), "id")
    v = loose.verify(p, "three")  # labelled, but math-verify reads no answer: malformed
    assert v.malformed and v.format is None


def test_split_by_files_keeps_test_rows_out_of_training(gsm_files):
    task = gsm_task(gsm_files)
    train_q = {r["question"] for r in gsm_rows(1, 12)}
    test_q = {r["question"] for r in gsm_rows(100, 6)}
    rng = random.Random(1)
    drawn = {task.sample(rng, "id", "train").prompt[3:-3] for _ in range(60)}
    assert drawn <= train_q and len(drawn) > 6
    ev = task.eval_set("id", 100, seed=0)
    assert sorted(p.prompt[3:-3] for p in ev) == sorted(test_q)  # all test rows, each once
    assert len(task.eval_set("id", 4, seed=0)) == 4


def test_split_by_filter_and_holdout(math_file):
    task = math_task(math_file)
    levels = lambda ps: {p.data["row"]["level"] for p in ps}  # noqa: E731
    id_test = task.eval_set("id", 100, seed=0)
    ood = task.eval_set("ood", 100, seed=0)
    assert levels(ood) == {4, 5} and len(ood) == 8
    assert levels(id_test) <= {1, 2, 3}
    rng = random.Random(0)
    id_train = {task.sample(rng, "id", "train").prompt for _ in range(200)}
    test_prompts = {p.prompt for p in id_test}
    assert id_train and test_prompts and not (id_train & test_prompts)  # holdout 0.5 by prompt hash
    assert len(id_train | test_prompts) == 12  # together: every level 1-3 row
    p = ood[0]
    assert task.verify(p, task.solve(p, "boxed")).correct
    fewer = math_task(math_file, splits={"id": {"data": "test", "where": [{"field": "level", "op": "<=", "value": 2},
                                                                     {"field": "problem", "regex": r"halve 1[12]?\."}]}})
    assert {p.data["row"]["problem"] for p in fewer.eval_set("id", 100, 0)} == \
        {"Problem 0: halve 1.", "Problem 10: halve 11.", "Problem 11: halve 12."}  # levels 1, 1, 2; not 16, 17


def test_len_rule_and_not_in(tmp_path):
    path = write_jsonl(tmp_path / "cd.jsonl", [{"nums": [1, 2, 3][: 2 + i % 2], "target": 3 + i % 2 * 3} for i in range(10)])
    splits = {"three": {"data": "train", "where": {"len": "nums", "op": "==", "value": 3}},
              "two": {"data": "train", "where": {"len": "nums", "not_in": [3]}}}
    task = DatasetTask("cd", load_task_spec(TASKS / "countdown.yaml", {"source": {"data_files": path}, "splits": splits}))
    three, two = task.eval_set("three", 100, 0), task.eval_set("two", 100, 0)
    assert len(three) == len(two) == 5
    assert {len(p.data["row"]["nums"]) for p in three} == {3} and {len(p.data["row"]["nums"]) for p in two} == {2}
    p = three[0]
    assert p.prompt.startswith("Using the numbers [1, 2, 3], create an equation that equals 6.")
    v = task.verify(p, "<think>add</think> <answer>1 + 2 + 3</answer>")
    assert v.correct and v.format == "reasoned"
    assert task.verify(p, "<answer>3*2*1</answer>").format == "answer_only"
    assert not task.verify(p, "<answer>3*2</answer>").correct
    assert task.verify(p, "1+2+3").malformed  # no answer tag
    with pytest.raises(UserError, match="no reference solutions"):
        task.solve(p, "reasoned")


def test_sampling_is_deterministic_and_seed_dependent(gsm_files):
    a, b = gsm_task(gsm_files), gsm_task(gsm_files)  # two instances: nothing rides on hidden state

    def draw(task, seed):
        rng = random.Random(seed)
        return [task.sample(rng, "id", "train").prompt for _ in range(20)]

    assert draw(a, 0) == draw(b, 0)
    assert draw(a, 0) != draw(a, 1)
    assert [p.prompt for p in a.eval_set("id", 4, 0)] == [p.prompt for p in b.eval_set("id", 4, 0)]
    assert [p.prompt for p in a.eval_set("id", 4, 0)] != [p.prompt for p in a.eval_set("id", 4, 3)]


# -- bad specs: one line naming the file and the key ------------------------------------------------

def _bad(tmp_path, gsm_files, **over):
    data = {"source": {"data_files": gsm_files}, "splits": {"id": {"train": "train", "test": "test"}},
            "prompt": "Q: {question} A:", "answer": {"field": "answer", "extract": r"####\s*(.+)"},
            "verifier": {"type": "math_verify"}}
    data.update(over)
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("over,match", [
    ({"verifier": {"type": "sympy_eval"}}, r"verifier: .*'sympy_eval'"),
    ({"formats": [{"name": "x", "regex": "(unclosed"}]}, r"formats\.0\.regex: not a valid regular expression"),
    ({"answer": {"field": "answer", "extract": "[a-"}}, r"answer\.extract: not a valid regular expression"),
    ({"prompt": "Q: {question.__class__}"}, r"prompt: stray"),
    ({"solutions": {"boxed": "{answer}"}}, r"solutions\.boxed: not a format label"),
    ({"answer": None}, r"answer: verifier 'math_verify' needs the reference answer"),
    ({"splits": {"id": {"data": "train", "train": "train"}}}, r"splits\.id: .*either `data`"),
    ({"splits": {"id": {"train": "train", "test": "test", "holdout": 0.2}}}, r"splits\.id: `holdout` applies"),
    ({"splits": {"id": {"data": "train", "where": {"field": "x", "in": [1], "op": "==", "value": 1}}}},
     r"splits\.id\.where\.0: .*exactly one test"),
    ({"splits": {"id": {"data": "train", "where": {"field": "x", "op": "~="}}}}, r"splits\.id\.where\.0\.op"),
    ({"source": {"name": "main"}}, r"source: .*set source\.path"),
    ({"verifier": {"type": "numeric", "abs_tol": -1}}, r"verifier\.numeric\.abs_tol"),
    ({"colour": "red"}, r"colour: Extra inputs"),
])
def test_bad_spec_is_one_line_naming_file_and_key(tmp_path, gsm_files, over, match):
    path = _bad(tmp_path, gsm_files, **over)
    with pytest.raises(UserError) as e:
        load_task_spec(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    import re

    assert re.search(match, msg), msg


@pytest.mark.parametrize("over,match", [
    ({"prompt": "Q: {quest} A:"}, r"prompt: field 'quest' is not a column of dataset split '(train|test)' \(columns: question, answer\)"),
    ({"splits": {"id": {"train": "train", "test": "validation"}}}, r"splits\.id\.test: the dataset has no split 'validation'"),
    ({"answer": {"field": "answer", "extract": r"\$\$(\d+)"}}, r"answer\.extract: no match in field 'answer' of row \d+"),
    ({"splits": {"id": {"data": "train", "where": {"field": "question", "regex": "zebra"}}}}, r"splits\.id: no rows"),
    ({"splits": {"id": {"data": "train", "where": {"field": "question", "op": ">", "value": 3}}}},
     r"splits\.id\.where\[0\]: cannot test field 'question'"),
    ({"source": {"data_files": {"train": "/nonexistent/x.jsonl"}}}, r"source\.data_files: file not found: /nonexistent/x\.jsonl"),
    ({"source": {"data_files": {"train": __file__}}}, r"source\.data_files: cannot tell the file type"),
])
def test_bad_data_is_one_line_naming_file_and_key(tmp_path, gsm_files, over, match):
    path = _bad(tmp_path, gsm_files, **over)
    task = DatasetTask("bad", load_task_spec(path))
    with pytest.raises(UserError) as e:
        task.eval_set("id", 10, 0)
        task.sample(random.Random(0), "id", "train")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    import re

    assert re.search(match, msg), msg


def test_row_problems_name_the_row(tmp_path):
    rows = gsm_rows(1, 3) + [{"question": None, "answer": "#### 5"}]
    path = write_jsonl(tmp_path / "holes.jsonl", rows)
    task = gsm_task({"train": path, "test": path})
    with pytest.raises(UserError, match=r"prompt: field 'question' is empty in row 3 of dataset split 'test'"):
        task.eval_set("id", 10, 0)
    path = write_jsonl(tmp_path / "text.jsonl", [{"question": "Who?", "answer": "#### \\text{}"}])
    task = gsm_task({"train": path, "test": path})
    p = task.eval_set("id", 1, 0)[0]
    with pytest.raises(UserError, match=r"row 0 of dataset split 'test': math-verify cannot read the reference answer"):
        task.verify(p, "42")


def test_missing_task_file_and_names(tmp_path):
    with pytest.raises(UserError, match="task file not found: /nonexistent.yaml"):
        load_task_spec("/nonexistent.yaml")
    assert spec_name(TASKS / "gsm8k.yaml") == "gsm8k"
    (tmp_path / "my-task.yaml").write_text("prompt: x\n")
    assert spec_name(tmp_path / "my-task.yaml") == "my-task"
    with pytest.raises(UserError, match=r"tasks\.x: source: Field required"):
        validate_spec({"prompt": "{a}", "splits": {"id": {"data": "train"}}, "verifier": {"type": "countdown"}}, "tasks.x")


def test_hub_failure_is_one_line_with_a_hint(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task = DatasetTask("gsm8k", load_task_spec(TASKS / "gsm8k.yaml"))
    with pytest.raises(UserError) as e:
        task.eval_set("id", 4, 0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{TASKS / 'gsm8k.yaml'}: source: cannot load dataset 'openai/gsm8k'")
    assert msg.endswith("--set 'tasks.gsm8k.source={data_files: {train: FILE.jsonl, test: FILE.jsonl}}'")


# -- shipped examples -------------------------------------------------------------------------------

def test_shipped_task_files_validate():
    names = sorted(p.stem for p in TASKS.glob("*.yaml"))
    assert names == ["countdown", "generalpoints", "gsm8k", "math500"]
    for name in names:
        assert spec_name(TASKS / f"{name}.yaml") == name
        load_task_spec(TASKS / f"{name}.yaml")


def test_generalpoints_files_and_face_card_rules(tmp_path, monkeypatch):
    from posttrain.tasks.generalpoints_data import write_generalpoints

    monkeypatch.chdir(tmp_path)
    paths = write_generalpoints("data/generalpoints")
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    train_hands = {tuple(sorted(r["numbers"])) for r in rows["id_train"]}
    test_hands = {tuple(sorted(r["numbers"])) for r in rows["id_test"]}
    assert rows["id_train"] and rows["id_test"] and not (train_hands & test_hands)
    assert all("count as 10" in r["rule"] for r in rows["id_train"] + rows["id_test"])
    for r in rows["ood_test"]:
        assert any(c in ("J", "Q", "K") for c in r["cards"].split()) and "11, 12 and 13" in r["rule"]
        assert all({"J": 11, "Q": 12, "K": 13}.get(c, v) == v for c, v in zip(r["cards"].split(), r["numbers"]))
    task = DatasetTask("generalpoints", load_task_spec(TASKS / "generalpoints.yaml"))  # the shipped relative paths
    ood = task.eval_set("ood", 50, 0)
    for p in ood:
        v = task.verify(p, task.solve(p, "eq"))
        assert v.correct and v.format == "eq"
    # the in-domain rule applied to an OOD hand is wrong: K is 13 there, not 10
    p = next(p for p in ood if "K" in p.data["row"]["cards"].split())
    tens = [10 if c in ("J", "Q", "K") else v for c, v in zip(p.data["row"]["cards"].split(), p.data["row"]["numbers"])]
    assert not task.verify(p, "+".join(map(str, tens)) + "=24").correct


# -- study config, eval CLI and training ---------------------------------------------------------------

def _study(gsm_files, math_file, **extra):
    return {"base_model": None, "tasks": {
        "gsm": {"file": str(TASKS / "gsm8k.yaml"), "source": {"data_files": gsm_files}, "prompt": "Q: {question} A:"},
        "mth": str(TASKS / "math500.yaml")},
        "id_task": {"task": "gsm"}, "ood_task": {"task": "mth", "split": "ood"}, "retention": [{"task": "facts"}],
        "methods": {"sft": {"method": "sft", "task": "gsm"}, "grpo": {"method": "grpo", "task": "gsm"}}, **extra}


def test_study_config_names_dataset_tasks(gsm_files, math_file):
    cfg = build_study_config(_study(gsm_files, math_file),
                             [f"tasks.mth.source={{data_files: {{test: {math_file}}}}}"])
    assert isinstance(cfg.make_task("gsm"), DatasetTask) and cfg.make_task("mth").spec.source.path is None
    assert cfg.tasks["mth"].origin.endswith("math500.yaml")
    assert cfg.world_key != cfg.world  # stage hashes see the task specs
    assert len(cfg.make_task("mth").eval_set("ood", 100, 0)) == 8
    plain = build_study_config({})
    assert plain.world_key == plain.world  # and nothing changes for studies without dataset tasks
    with pytest.raises(UserError, match=r"tasks\.points24: 'points24' is a built-in task"):
        build_study_config({"tasks": {"points24": str(TASKS / "gsm8k.yaml")}})
    with pytest.raises(UserError, match=r"methods\.sft: task 'cd' has no reference solutions"):
        build_study_config({"tasks": {"cd": str(TASKS / "countdown.yaml")}, "methods": {"sft": {"method": "sft", "task": "cd"}}})
    with pytest.raises(UserError, match=r"methods\.sft\.expert_format: task 'gsm' has reference solutions in format\(s\) hash"):
        build_study_config(_study(gsm_files, math_file, methods={"sft": {"method": "sft", "task": "gsm", "expert_format": "plain"}}))
    cd = {"cd": str(TASKS / "countdown.yaml")}
    with pytest.raises(UserError, match=r"pretrain\.mixture\.1: task 'cd' has reference solutions in format\(s\) none"):
        build_study_config({"tasks": cd, "pretrain": {"mixture": [{"task": "facts"}, {"task": "cd"}]}})
    with pytest.raises(UserError, match=r"pretrain\.mixture\.0: task 'gsm' .* in format\(s\) hash, .* as plain"):
        build_study_config(_study(gsm_files, math_file, pretrain={"mixture": [{"task": "gsm", "formats": {"plain": 1}}]}))
    build_study_config(_study(gsm_files, math_file, pretrain={"mixture": [{"task": "gsm"}]}))  # hash demos: fine
    with pytest.raises(UserError, match=r"task file not found: /nonexistent\.yaml"):
        build_study_config({"tasks": {"x": "/nonexistent.yaml"}})
    with pytest.raises(UserError, match=r"task 'mth' has no split 'nope'"):
        build_study_config(_study(gsm_files, math_file, ood_task={"task": "mth", "split": "nope"}))


@pytest.mark.slow
def test_eval_cli_on_a_dataset_task(tiny_checkpoint, tmp_path, gsm_files):
    from test_cli import cli

    out = tmp_path / "scores.json"
    r = cli("eval", tiny_checkpoint, "--task-spec", TASKS / "gsm8k.yaml", "--tasks", "gsm8k/id",
            "--set", f"tasks.gsm8k.source={{data_files: {{train: {gsm_files['train']}, test: {gsm_files['test']}}}}}",
            "--set", "tasks.gsm8k.prompt='Q: {question} A:'", "--set", "eval.n_per_split=5",
            "--set", "eval.n_sampled_problems=2", "--set", "eval.n_samples=2", "--set", "eval.pass_k=[1,2]",
            "--set", "eval.max_new_tokens=8", "--out", out)
    assert r.returncode == 0, r.stderr
    s = json.loads(out.read_text())["gsm8k/id"]
    assert s["n"] == 5 and 0 <= s["acc"] <= 1 and set(s["pass_at_k"]) == {"1", "2"}
    assert abs(sum(s["format_share_greedy"].values()) - 1) < 1e-9
    assert all(e["prompt"].startswith("Q: What is 10") for e in s["examples"])  # the test file's rows
    r = cli("eval", tiny_checkpoint, "--task-spec", TASKS / "gsm8k.yaml", "--tasks", "gsm8k/id",
            "--set", "tasks.gsm8k.source={data_files: {train: /nonexistent/a.jsonl, test: b.jsonl}}")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "file not found: /nonexistent/a.jsonl" in lines[0], r.stderr


def _train(task, tiny, out, **kw):
    from posttrain.train.loop import train

    base = dict(task=task.name, steps=3, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, lr=1e-3,
                trackers=["none"])
    return train(TrainConfig(**{**base, **kw}), init_dir=tiny, ref_dir=tiny, out_dir=out, task=task,
                 expert_format="hash" if kw.get("objective") == "sft" else None, seed=0, device="cpu")


@pytest.mark.slow
def test_sft_and_grpo_train_on_a_dataset_task(tiny_checkpoint, tmp_path, gsm_files):
    task = gsm_task(gsm_files)
    sft = _train(task, tiny_checkpoint, tmp_path / "sft", objective="sft", data="expert")
    rows = [json.loads(x) for x in sft.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all("loss" in r for r in rows[1:])
    a, b = load_file(str(tiny_checkpoint / "model.safetensors")), load_file(str(sft.model_dir / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # SFT on the reference solutions moved the weights
    grpo = _train(task, tiny_checkpoint, tmp_path / "grpo", objective="grpo")
    rows = [json.loads(x) for x in grpo.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:  # every rollout was scored by math-verify through the task
        assert 0 <= r["rollout/reward"] <= 1 and 0 <= r["rollout/malformed"] <= 1
        assert abs(r["rollout/malformed"] + sum(v for k, v in r.items() if k.startswith("rollout/format/")) - 1) < 1e-9
    assert (grpo.model_dir / "config.json").is_file()


@pytest.mark.slow
def test_study_on_dataset_tasks(tiny_checkpoint, tmp_path, gsm_files, math_file):
    from posttrain.study import run_study

    small = {"steps": 2, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8, "trackers": ["none"]}
    data = _study(gsm_files, math_file, base_model=str(tiny_checkpoint), retention=[{"task": "mth", "split": "id"}],
                  methods={"sft": {"method": "sft", "task": "gsm", **small}, "grpo": {"method": "grpo", "task": "gsm", **small}},
                  eval={"n_per_split": 4, "n_sampled_problems": 2, "n_samples": 2, "pass_k": [1], "max_new_tokens": 8},
                  diagnostics={"spectral": False}, repair={"damaged": None})
    data["tasks"]["mth"] = {"file": str(TASKS / "math500.yaml"), "source": {"data_files": {"test": math_file}},
                            "prompt": "{problem} Answer:"}  # the tiny tokenizer knows no newline
    res = run_study(build_study_config(data), tmp_path / "run", device="cpu", log=lambda msg: None)
    assert set(res["models"]) == {"base", "sft", "grpo"}
    scores = json.loads((tmp_path / "run" / "eval" / "sft.json").read_text())
    assert set(scores) == {"gsm/id", "mth/ood", "mth/id"} and scores["gsm/id"]["n"] == 4
    # the expert format is chosen among the formats the reference solutions are written in
    assert json.loads((tmp_path / "run" / "methods" / "sft" / "train.json").read_text())["expert_format"] == "hash"


def test_pretraining_mixture_writes_reference_solutions(gsm_files):
    from posttrain.config import TaskRef
    from posttrain.train.pretrain import mixture_texts

    task = gsm_task(gsm_files)
    prompts, completions = mixture_texts({"gsm8k": task}, [TaskRef(task="gsm8k")], random.Random(0), 6)
    train = {r["question"]: r["answer"] for r in gsm_rows(1, 12)}
    assert [train[p[3:-3]] for p in prompts] == completions  # the training rows' own solutions


def test_stage_hashes_see_spec_and_data_changes(tmp_path, gsm_files, math_file):
    from posttrain.config import config_hash

    key = lambda: config_hash({"w": build_study_config(_study(gsm_files, math_file)).world_key})  # noqa: E731
    before = key()
    assert key() == before
    Path(gsm_files["test"]).write_text(Path(gsm_files["test"]).read_text().replace("#### 203", "#### 2030"))
    assert key() != before  # the same file with changed rows
    changed = _study(gsm_files, math_file)
    changed["tasks"]["gsm"]["prompt"] = "Question: {question} Answer:"
    assert config_hash({"w": build_study_config(changed).world_key}) not in (before, key())


def test_unreadable_data_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    task = gsm_task({"train": str(bad), "test": str(bad)})
    with pytest.raises(UserError) as e:
        task.eval_set("id", 2, 0)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{TASKS / 'gsm8k.yaml'}: source: cannot load dataset 'json'")
