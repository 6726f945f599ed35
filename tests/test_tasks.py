import random

import pytest

from posttrain.errors import UserError
from posttrain.tasks import build_task
from posttrain.tasks.exprs import ParseError, parse_expression, render
from posttrain.tasks.points24 import solutions


# ---- the expression parser -------------------------------------------------------------------

def test_parser_precedence_and_exact_division():
    p = parse_expression("(10-4)*(2+2)")
    assert p.value == 24 and p.numbers == [10, 4, 2, 2]
    assert parse_expression("8/3*3").value == 8  # exact rationals, no float error
    assert parse_expression("2+3*4").value == 14


@pytest.mark.parametrize("bad,why", [
    ("", "empty or too long"), ("2+", "unexpected end"), ("(2+3", "unexpected end"), ("2++3", "unexpected token '+'"),
    ("-2+3", "unexpected token '-'"), ("02+3", "leading zero"), ("2 + 3", "unexpected character at 1: ' '"),
    ("2+3)", "trailing tokens"), ("2/0", "division by zero"), ("2x3", "unexpected character at 1: 'x'"),
    ("()", "unexpected token ')'"), ("(2+3(", "expected ')'"),
])
def test_parser_rejects_malformed(bad, why):
    with pytest.raises(ParseError) as e:
        parse_expression(bad)
    assert str(e.value) == why


def test_render_uses_fewest_parentheses():
    assert render(("*", ("-", 10, 4), ("+", 2, 2))) == "(10-4)*(2+2)"
    assert render(("-", 10, ("-", 4, 2))) == "10-(4-2)"
    assert render(("+", ("*", 3, 4), 2)) == "3*4+2"
    assert render(("/", 12, ("*", 2, 3))) == "12/(2*3)"
    # + and * are associative: an equal-precedence right operand needs no parentheses
    assert render(("+", 1, ("+", 2, 3))) == "1+2+3" and render(("*", 2, ("*", 3, 4))) == "2*3*4"
    assert render(("+", 1, ("-", 2, 3))) == "1+2-3" and render(("*", 2, ("/", 3, 4))) == "2*3/4"


def test_parser_length_limit_and_error_messages():
    ok = "1+" * 31 + "12"  # 64 characters: the default limit
    assert len(ok) == 64 and parse_expression(ok).value == 43
    with pytest.raises(ParseError, match="^empty or too long$"):
        parse_expression(ok + "3")


# ---- points24 --------------------------------------------------------------------------------

def P(cards, rule="ten", target=24):
    from posttrain.tasks import Problem

    return Problem("points24", "id" if rule == "ten" else "ood", "", {"cards": cards, "rule": rule, "target": target})


def test_points24_correct_wrong_malformed():
    t = build_task("points24")
    prob = P(["K", "4", "2", "2"])  # K = 10 under the training rule
    assert t.verify(prob, "(10-4)*(2+2)=24").correct
    assert t.verify(prob, "10-4=6,2+2=4,6*4=24").correct
    v = t.verify(prob, "(10-4)*2*2=24")  # well formed, evaluates to 24, uses the right cards
    assert v.correct and v.format == "eq"
    wrong = t.verify(prob, "10+4+2+2=24")  # well formed, value 18
    assert not wrong.correct and not wrong.malformed
    assert not t.verify(prob, "(13-4)*2+2=24").correct  # K is 10 here, not 13
    assert not t.verify(prob, "(10-4)*(2+2)=25").correct
    bad_step = t.verify(prob, "10-4=7,2+2=4,7*4=28")
    assert not bad_step.correct and not bad_step.malformed and bad_step.format == "steps"
    for text in ["", "24", "(10-4)*(2+2)", "(10-4)*(2+2)=24.", "(10-4)x(2+2)=24", "10-4=6,,6*4=24", "answer: 24",
                 "(10-4)*(2+2)=24=24", "10-4=6,2+2=4"]:
        v = t.verify(prob, text)
        assert v.malformed and not v.correct, text


def test_points24_ood_rule_changes_face_values():
    t = build_task("points24")
    prob = P(["K", "Q", "J", "A"], rule="seq")  # 13, 12, 11, 1
    assert t.verify(prob, "13+12-11*1=14").malformed is False
    ok = t.verify(prob, "(13-11)*12*1=24")
    assert ok.correct
    assert not t.verify(prob, "(10-10)*10+1=24").correct


def test_points24_solver_demos_always_verify():
    rng = random.Random(0)
    for params in ({}, {"n_cards": 3, "target": 12}):
        t = build_task("points24", params)
        for split in t.splits:
            for _ in range(100):
                prob = t.sample(rng, split)
                if split == "ood":
                    assert any(c in "JQK" for c in prob.data["cards"])
                for fmt in t.formats:
                    text = t.solve(prob, fmt, rng)
                    v = t.verify(prob, text)
                    assert v.correct and v.format == fmt, (prob, text)


def test_points24_solutions_enumerates_known_hand():
    sols = solutions((1, 2, 3, 4), 24)
    assert sols and all(s[-1][3] == 24 for s in sols)
    assert solutions((1, 1, 1, 1), 24) == ()


def test_points24_holdout_separates_train_and_test_hands():
    t = build_task("points24", {"holdout": 0.3})
    rng = random.Random(1)
    train = {tuple(sorted(t._values(t.sample(rng, "id", "train")))) for _ in range(300)}
    test = {tuple(sorted(t._values(t.sample(rng, "id", "test")))) for _ in range(100)}
    assert train and test and not train & test


def test_points24_bad_params():
    with pytest.raises(UserError, match="n_cards"):
        build_task("points24", {"n_cards": 9})
    with pytest.raises(UserError, match="no parameter.*cards"):
        build_task("points24", {"cards": 3})


# ---- arith -----------------------------------------------------------------------------------

def A(nums, ops):
    from posttrain.tasks import Problem

    value = nums[0]
    for o, n in zip(ops, nums[1:]):
        value = value + n if o == "+" else value - n
    return Problem("arith", "id", "", {"nums": nums, "ops": ops, "answer": value})


def test_arith_formats_correct_wrong_malformed():
    t = build_task("arith")
    prob = A([23, 45, 12], ["+", "-"])  # 56
    assert t.verify(prob, "56").correct and t.verify(prob, "56").format == "direct"
    assert t.verify(prob, "23+45=68,68-12=56").correct
    assert t.verify(prob, "x=23;x+=45;x-=12;print(x)").correct
    assert t.verify(prob, "x=56;print(x)").correct  # a program is judged by what it prints
    assert not t.verify(prob, "57").correct and not t.verify(prob, "57").malformed
    wrong_step = t.verify(prob, "23+45=67,67-12=55")
    assert not wrong_step.correct and not wrong_step.malformed
    # right final number reached through the wrong question is still wrong
    assert not t.verify(prob, "23+45=68,68-12=56,56+0=56").correct
    assert not t.verify(prob, "x=23;x+=45;x-=11;print(x)").correct
    for text in ["", "056", "56 ", "-56", "23+45=68;68-12=56", "x=23;x+=45;x-=12", "x=23;y+=45;print(x)",
                 "x=23;x*=2;print(x)", "the answer is 56", "23+45=68,"]:
        v = t.verify(prob, text)
        assert v.malformed and not v.correct, text


def test_arith_solver_demos_always_verify_and_ood_is_longer():
    t = build_task("arith")
    rng = random.Random(0)
    for split, n_ops in (("id", t.n_ops), ("ood", t.n_ops_ood)):
        for _ in range(100):
            prob = t.sample(rng, split)
            assert len(prob.data["ops"]) == n_ops
            for fmt in t.formats:
                v = t.verify(prob, t.solve(prob, fmt, rng))
                assert v.correct and v.format == fmt


# ---- facts and strings -----------------------------------------------------------------------

def test_facts_kb_is_deterministic_and_verified_strictly():
    a, b = build_task("facts", {"kb_seed": 7}), build_task("facts", {"kb_seed": 7})
    assert a.kb == b.kb and len(a.all_problems()) == a.n_entities * len(a.relations)
    prob = a.all_problems()[0]
    answer = prob.data["answer"]
    assert a.verify(prob, answer).correct
    other = next(v for v in ("red", "blue") if v != answer) if prob.data["relation"] == "color" else \
        next(v for v in ("oslo", "lima") if v != answer)
    assert not a.verify(prob, other).correct and not a.verify(prob, other).malformed
    assert a.verify(prob, answer + " ").malformed and a.verify(prob, "zebra").malformed


def test_strings_verify():
    t = build_task("strings")
    rng = random.Random(3)
    prob = t.sample(rng, "id")
    assert t.verify(prob, prob.data["answer"]).correct
    assert t.verify(prob, "A").malformed and t.verify(prob, "").malformed
    long = t.sample(rng, "ood")
    assert len(long.prompt.split()[2].rstrip(":")) > t.max_len


def test_unknown_task_and_split():
    with pytest.raises(UserError, match="unknown task"):
        build_task("nope")
    with pytest.raises(UserError, match="no split"):
        build_task("facts").sample(random.Random(0), "ood")


def test_points24_samples_name_their_task_split_rule_and_prompt():
    t = build_task("points24")
    rng = random.Random(3)
    for split, rule, tag in (("id", "ten", "JQK=10"), ("ood", "seq", "JQK=11,12,13")):
        p = t.sample(rng, split)
        cards = p.data["cards"]
        assert (p.task, p.split, p.data["rule"], p.data["target"]) == ("points24", split, rule, 24)
        assert len(cards) == 4 and p.prompt == f"pts {cards[0]} {cards[1]} {cards[2]} {cards[3]} {tag} t24:"


def test_points24_default_partition_draws_from_every_hand():
    # without a partition nothing is held out: training and held-out hands both come up
    t = build_task("points24", {"holdout": 0.3})
    rng = random.Random(1)
    test = {tuple(sorted(t._values(t.sample(rng, "id", "test")))) for _ in range(100)}
    drawn = {tuple(sorted(t._values(t.sample(rng, "id")))) for _ in range(300)}
    assert drawn & test and drawn - test


def test_points24_solve_is_canonical_without_rng_and_varied_with_one():
    from posttrain.tasks.points24 import solutions

    t = build_task("points24")
    prob = P(["K", "3", "5", "2"])  # 10 3 5 2
    first = solutions((2, 3, 5, 10), 24)[0]
    assert t.solve(prob, "steps") == ",".join(f"{a}{op}{b}={r}" for a, op, b, r in first)
    texts = {t.solve(prob, "steps", random.Random(s)) for s in range(20)}
    assert len(texts) > 1 and all(t.verify(prob, x).correct for x in texts)


def test_apply_op_integer_arithmetic():
    from posttrain.tasks.exprs import apply_op

    assert apply_op("+", 3, 4) == 7 and apply_op("*", 3, 4) == 12
    assert apply_op("-", 3, 3) == 0 and apply_op("-", 2, 3) is None  # no negative results
    assert apply_op("/", 6, 3) == 2 and apply_op("/", 7, 2) is None and apply_op("/", 1, 0) is None
    with pytest.raises(ValueError, match=r"^\^$"):
        apply_op("^", 2, 3)


def test_facts_problems_name_their_task_split_and_relation():
    d = build_task("facts")
    assert (d.n_entities, d.relations, d.kb_seed) == (60, ("color", "city"), 1234)  # the documented defaults
    t = build_task("facts", {"n_entities": 3, "relations": ["pet", "city"]})
    p = t.sample(random.Random(0), "id")
    assert (p.task, p.split) == ("facts", "id") and p.data["relation"] in ("pet", "city")
    assert t.verify(p, t.solve(p, "default")).correct
    every = t.all_problems()
    assert len(every) == 6 and {(q.task, q.split) for q in every} == {("facts", "id")}
    assert [q.prompt for q in every[:2]] == [f"fact pet of {t.kb[0][0]}:", f"fact city of {t.kb[0][0]}:"]
    assert all(t.verify(q, t.solve(q, "default")).correct for q in every)


def test_strings_default_lengths_and_problem_fields():
    t = build_task("strings")
    assert (t.min_len, t.max_len, t.ood_len) == (3, 6, 8)  # the documented defaults
    rng = random.Random(0)
    for split, lengths in (("id", {3, 4, 5, 6}), ("ood", {7, 8})):
        ps = [t.sample(rng, split) for _ in range(200)]
        assert {(p.task, p.split) for p in ps} == {("strings", split)}
        assert {len(p.prompt.split()[2][:-1]) for p in ps} == lengths
