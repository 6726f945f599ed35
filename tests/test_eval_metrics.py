"""Evaluation numbers: pass@k by hand, problem sets, and the scores of one split from known verdicts."""

import pytest

from posttrain.config import EvalConfig
from posttrain.evaluation import evaluate as ev
from posttrain.evaluation.evaluate import eval_problems, evaluate_model, evaluate_split, pass_at_k
from posttrain.tasks import Problem, build_task
from posttrain.tasks.base import held_out
from posttrain.train.rollout import Rollouts


@pytest.mark.parametrize("n,c,k,expect", [
    (4, 1, 2, 0.5),          # 1 - C(3,2)/C(4,2) = 1 - 3/6; the biased 1 - (3/4)^2 would give 0.4375
    (4, 2, 2, 5 / 6),        # n - c == k: 1 - C(2,2)/C(4,2) = 1 - 1/6
    (5, 2, 3, 0.9),          # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (8, 3, 4, 1 - 5 / 70),   # 1 - C(5,4)/C(8,4)
    (10, 1, 5, 0.5),         # 1 - C(9,5)/C(10,5) = 1 - 126/252
    (4, 3, 2, 1.0),          # n - c < k: every draw of 2 holds a correct one
    (4, 0, 2, 0.0),
    (4, 0, 4, 0.0),
    (4, 4, 4, 1.0),
    (3, 1, 3, 1.0),          # k == n: all samples drawn
    (6, 2, 1, 2 / 6),        # pass@1 = c / n
])
def test_pass_at_k_unbiased_estimator_by_hand(n, c, k, expect):
    assert pass_at_k(n, c, k) == pytest.approx(expect, abs=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5 > n=4"):
        pass_at_k(4, 1, 5)
    assert pass_at_k(4, 1, 4) == 1.0


def test_eval_problems_take_a_dataset_tasks_own_held_out_rows():
    class Rows:  # a task that owns its evaluation rows (dataset tasks): asked with the split, n and seed
        name = "rows"

        def eval_set(self, split, n, seed):
            return [("row", split, n, seed)]

        def all_problems(self):
            raise AssertionError("eval_set comes first")

        def sample(self, *a):
            raise AssertionError("eval_set comes first")

    assert eval_problems(Rows(), "ood", 7, seed=3) == [("row", "ood", 7, 3)]


def test_eval_problems_are_fixed_per_seed_and_held_out():
    arith = build_task("arith")
    a = eval_problems(arith, "ood", 6, seed=0)
    assert a == eval_problems(arith, "ood", 6, seed=0) and a != eval_problems(arith, "ood", 6, seed=1)
    assert len(a) == 6 and {p.split for p in a} == {"ood"} and all(len(p.data["ops"]) == 3 for p in a)
    # a task with held-out hands evaluates only on those
    pts = build_task("points24", {"holdout": 0.3})
    probs = eval_problems(pts, "id", 20, seed=0)
    assert all(held_out("points24", ("ten", tuple(sorted(int(v) if v.isdigit() else {"A": 1}.get(v, 10)
                                                          for v in p.data["cards"]))), 0.3) for p in probs)
    # the knowledge base is evaluated whole, whatever n
    facts = build_task("facts", {"n_entities": 5})
    assert eval_problems(facts, "id", 2, seed=0) == facts.all_problems() and len(facts.all_problems()) == 10


def arith(prompt_nums, ops):
    value = prompt_nums[0]
    for op, x in zip(ops, prompt_nums[1:]):
        value = value + x if op == "+" else value - x
    expr = str(prompt_nums[0]) + "".join(f"{o}{x}" for o, x in zip(ops, prompt_nums[1:]))
    return Problem("arith", "id", f"arith {expr}:", {"nums": prompt_nums, "ops": ops, "answer": value})


PROBLEMS = [arith([7, 5, 3], ["+", "-"]), arith([2, 2, 1], ["+", "+"]), arith([9, 1, 1], ["-", "-"])]
# greedy: right (direct), wrong (code), malformed
GREEDY = {PROBLEMS[0].prompt: ("9", True), PROBLEMS[1].prompt: ("x=1;print(x)", True), PROBLEMS[2].prompt: ("so 7", True)}
# sampled (4 per problem, first two problems): an unfinished completion is malformed whatever it says
SAMPLED = {PROBLEMS[0].prompt: [("9", True), ("9", True), ("8", True), ("9", False)],
           PROBLEMS[1].prompt: [("x=2;x+=2;x+=1;print(x)", False), ("2+2=4,4+1=5", True), ("x", True), ("5 ", True)]}


CALLS = []


def fake_generate(model, tok, prompts, n=1, max_new_tokens=0, greedy=False, **kw):
    CALLS.append(dict(prompts=list(prompts), n=n, max_new_tokens=max_new_tokens, greedy=greedy, model=model, tok=tok, **kw))
    rows = [GREEDY[p] for p in prompts] if greedy else [s for p in prompts for s in SAMPLED[p]]
    assert len(rows) == len(prompts) * n
    return Rollouts([[]] * len(rows), [[]] * len(rows), [t for t, _ in rows], [f for _, f in rows], n)


def test_evaluate_split_scores_known_verdicts(monkeypatch):
    import random

    monkeypatch.setattr(ev, "generate", fake_generate)
    CALLS.clear()
    cfg = EvalConfig(n_samples=4, pass_k=[1, 2, 4], n_sampled_problems=2, max_new_tokens=7, batch_size=5, temperature=0.7)
    out = evaluate_split(None, None, build_task("arith"), PROBLEMS, cfg, seed=3)
    # one greedy pass over every problem, one sampled pass over the first n_sampled_problems
    greedy, sampled = CALLS
    assert (greedy.pop("model"), greedy.pop("tok"), sampled.pop("model"), sampled.pop("tok")) == (None,) * 4
    assert greedy == dict(prompts=[p.prompt for p in PROBLEMS], n=1, max_new_tokens=7, greedy=True, batch_size=5)
    gen = sampled.pop("generator")
    assert sampled == dict(prompts=[p.prompt for p in PROBLEMS[:2]], n=4, max_new_tokens=7, greedy=False,
                           temperature=0.7, batch_size=5)
    # the sampling seed depends on (seed, task, split) only, so every model samples alike
    assert gen.initial_seed() == random.Random("3/sample/arith/id").getrandbits(63)
    assert out["n"] == 3
    assert out["acc"] == pytest.approx(1 / 3) and out["malformed"] == pytest.approx(1 / 3)
    assert out["format_share_greedy"] == pytest.approx({"code": 1 / 3, "direct": 1 / 3, "malformed": 1 / 3})
    assert [e["correct"] for e in out["examples"]] == [True, False, False]
    assert out["examples"][1] == {"prompt": PROBLEMS[1].prompt, "completion": "x=1;print(x)", "correct": False}
    # problem 0: 2 of 4 correct (the unfinished "9" does not count); problem 1: 1 of 4 (the cot)
    assert out["sampled_acc"] == pytest.approx(3 / 8)
    assert out["pass_at_k"]["1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["pass_at_k"]["2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
    assert out["pass_at_k"]["4"] == pytest.approx(1.0)
    assert out["format_share"] == pytest.approx({"cot": 1 / 8, "direct": 3 / 8, "malformed": 4 / 8})
    assert out["sampled_malformed"] == pytest.approx(4 / 8)


def test_evaluate_without_sampling_reuses_the_greedy_shares(monkeypatch):
    monkeypatch.setattr(ev, "generate", fake_generate)
    cfg = EvalConfig(n_samples=4, pass_k=[1], n_sampled_problems=0)

    class Model:
        evaluated = False

        def eval(self):
            self.evaluated = True

    m, tok = Model(), object()
    CALLS.clear()
    out = evaluate_model(m, tok, {"arith": build_task("arith")}, {"arith/id": PROBLEMS}, cfg, seed=0)
    assert m.evaluated and list(out) == ["arith/id"]
    s = out["arith/id"]
    assert s["format_share"] == s["format_share_greedy"] and "pass_at_k" not in s and "sampled_acc" not in s
    # the model, tokenizer and seed reach the generation
    import random

    CALLS.clear()
    evaluate_model(m, tok, {"arith": build_task("arith")}, {"arith/id": PROBLEMS[:2]},
                   EvalConfig(n_samples=4, pass_k=[1], n_sampled_problems=2), seed=5)
    assert [(c["model"], c["tok"]) for c in CALLS] == [(m, tok), (m, tok)]
    assert CALLS[1]["generator"].initial_seed() == random.Random("5/sample/arith/id").getrandbits(63)


def test_format_shares_of_one_and_of_no_verdict():
    from posttrain.evaluation.evaluate import _shares
    from posttrain.tasks import MALFORMED, Verdict

    assert _shares([Verdict(True, False, "cot")]) == {"cot": 1.0}
    assert _shares([MALFORMED, Verdict(False, False, "code"), MALFORMED]) == {"code": 1 / 3, "malformed": 2 / 3}
    assert _shares([]) == {}
