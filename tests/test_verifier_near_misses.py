"""Verifiers against near misses, for every task and format: an answer off by one, a wrong card, a
wrong intermediate step is well formed and wrong; anything outside the format is malformed."""

import pytest

from posttrain.errors import UserError
from posttrain.tasks import Problem, Verdict, build_task
from posttrain.tasks.points24 import card_value, solutions, steps_to_expression

OK = "ok"
WRONG = "wrong"
BAD = "malformed"


def check(task, problem, text, expect, fmt):
    v = task.verify(problem, text)
    assert isinstance(v, Verdict)
    if expect == OK:
        assert (v.correct, v.malformed, v.format) == (True, False, fmt), text
        assert v.reward == 1.0
    elif expect == WRONG:
        assert (v.correct, v.malformed, v.format) == (False, False, fmt), text
        assert v.reward == 0.0
    else:
        assert (v.correct, v.malformed, v.format) == (False, True, None), text


def pts(cards, rule="ten", target=24):
    return Problem("points24", "id" if rule == "ten" else "ood", "", {"cards": cards, "rule": rule, "target": target})


P24 = build_task("points24")
HAND = pts(["K", "3", "5", "2"])  # 10 3 5 2


@pytest.mark.parametrize("text,expect", [
    ("(10+5-3)*2=24", OK),
    ("2*(10+5-3)=24", OK),
    ("(10+5-3)*2=23", WRONG),    # the stated result is off by one
    ("(10+5-3)*2=25", WRONG),
    ("(10+5-2)*2=26", WRONG),    # consistent, but 26
    ("10*2+5-3=24", WRONG),      # claims 24, is 22
    ("(10+5-3)*2+1=25", WRONG),  # a fifth number
    ("(10+6-4)*2=24", WRONG),    # 24, with cards not in the hand
    ("(10+5-3)*2*1=24", WRONG),  # 24 with an extra card
    ("(13+5-3)*2=30", WRONG),    # K is 10 under the training rule
    ("10*3-5-2+1=24", WRONG),
    ("(10+5-3)*2=024", BAD),     # leading zero in the result
    ("(10+5-3)*2=", BAD),
    ("(10+5-3)*2=-24", BAD),
    ("(10+5-3)*2==24", BAD),
    ("(10+5-3)*2 = 24", BAD),
    ("(10+5-3))*2=24", BAD),
    ("=24", BAD),
])
def test_points24_eq_near_misses(text, expect):
    check(P24, HAND, text, expect, "eq")


@pytest.mark.parametrize("text,expect", [
    ("10+5=15,15-3=12,12*2=24", OK),
    ("5+10=15,15-3=12,2*12=24", OK),          # operand order is free
    ("10+5=15,15-3=12,12*2=23", WRONG),       # last step stated one too low
    ("10+5=15,15-3=12,12*2=25", WRONG),
    ("10+5=15,15-2=13,13*3=39", WRONG),       # correct steps, wrong total
    ("10+5=16,16-3=13,13*2=26", WRONG),       # one wrong step propagated
    ("10+5=15,15-3=12,12*3=36", WRONG),       # 3 used twice, 2 never
    ("10+6=16,16-3=13,13*2=26", WRONG),       # a card not in the hand
    ("10+5=15,15-3=12,12+12=24", WRONG),      # reuses an intermediate result
    ("10*2=20,20+5=25,25-3=22", WRONG),
    ("10-5=5,5*3=15,15+2=17", WRONG),
    ("5*2=11,11+10=21,21+3=24", WRONG),       # reaches 24 with the right cards, but 5*2 is not 11
    ("10+5=15,15-3=12", BAD),                 # too few steps
    ("10+5=15,15-3=12,12*2=24,24*1=24", BAD), # too many steps
    ("10+5=15;15-3=12;12*2=24", BAD),
    ("10+5=15,15-3=12,12x2=24", BAD),
    ("10+5=15,15-3=12,12*2=024", BAD),
])
def test_points24_steps_near_misses(text, expect):
    check(P24, HAND, text, expect, "steps")


def test_points24_division_steps_and_the_card_multiset():
    hand = pts(["6", "2", "8", "A"])  # 6 2 8 1
    check(P24, hand, "6/2=3,8*3=24,24*1=24", OK, "steps")
    check(P24, hand, "6/2=4,8*4=32,32-8=24", WRONG, "steps")
    check(P24, hand, "6/0=0,8*3=24,24*1=24", WRONG, "steps")  # division by zero, and 0 is no card
    check(P24, hand, "2-6=4,8*4=32,32-1=31", WRONG, "steps")  # negative results do not exist
    check(P24, hand, "6/2*8*1=24", OK, "eq")
    check(P24, hand, "6/4*8*2=24", WRONG, "eq")  # 24, but 4 is not a card and 2 is used once
    two = pts(["3", "3", "8", "8"])
    check(P24, two, "8/(3-8/3)=24", OK, "eq")                 # exact rationals
    check(P24, two, "8/(3-8/3)=23", WRONG, "eq")
    check(P24, two, "8/(3-8/8)=4", WRONG, "eq")
    check(P24, pts(["3", "3", "3", "8"]), "8/(3-8/3)=24", WRONG, "eq")  # the hand has one 8
    # a different target changes the verdict of the same text
    check(P24, pts(["K", "3", "5", "2"], target=12), "(10+5-3)*2=24", WRONG, "eq")
    check(P24, pts(["K", "3", "5", "2"], target=12), "10+5=15,15-3=12", BAD, "steps")


def test_points24_face_cards_under_each_rule():
    assert [card_value(c, "ten") for c in ("A", "2", "10", "J", "Q", "K")] == [1, 2, 10, 10, 10, 10]
    assert [card_value(c, "seq") for c in ("A", "9", "10", "J", "Q", "K")] == [1, 9, 10, 11, 12, 13]
    ood = pts(["K", "J", "A", "A"], rule="seq")  # 13 11 1 1
    check(P24, ood, "13+11=24,24*1=24,24*1=24", OK, "steps")
    check(P24, ood, "(13+11)*1*1=24", OK, "eq")
    check(P24, pts(["K", "J", "A", "A"]), "(13+11)*1*1=24", WRONG, "eq")  # under "ten" these are 10, 10
    check(P24, pts(["Q", "Q", "A", "2"], rule="seq"), "12+12=24,24*1=24,24*2=48", WRONG, "steps")


def test_points24_solutions_and_expressions():
    sols = solutions((2, 3, 5, 10), 24)
    assert ((10, "+", 5, 15), (15, "-", 3, 12), (12, "*", 2, 24)) in sols
    for s in sols:  # every solution reaches the target in 3 steps, larger operand first for + and *
        assert len(s) == 3 and s[-1][3] == 24
        assert all(a >= b for a, op, b, _ in s if op in "+*")
    assert steps_to_expression((2, 3, 5, 10), ((10, "+", 5, 15), (15, "-", 3, 12), (12, "*", 2, 24))) == "(10+5-3)*2"
    assert solutions((1, 1, 1, 1), 24) == ()
    t = build_task("points24")
    for fmt in t.formats:
        assert t.verify(HAND, t.solve(HAND, fmt)).correct


def test_points24_parameters_are_validated():
    for params, match in (({"n_cards": 1}, "n_cards"), ({"n_cards": 6}, "n_cards"), ({"target": 0}, "target"),
                          ({"target": 201}, "target"), ({"holdout": 1.0}, "holdout"), ({"holdout": -0.1}, "holdout")):
        with pytest.raises(UserError, match=match):
            build_task("points24", params)
    build_task("points24", {"n_cards": 2, "target": 1, "holdout": 0.0})
    build_task("points24", {"n_cards": 5, "target": 200, "holdout": 0.99})


# ---- arith ---------------------------------------------------------------------------------------

ARITH = build_task("arith")
A = Problem("arith", "id", "arith 7+5-3:", {"nums": [7, 5, 3], "ops": ["+", "-"], "answer": 9})


@pytest.mark.parametrize("text,expect,fmt", [
    ("9", OK, "direct"),
    ("8", WRONG, "direct"),
    ("10", WRONG, "direct"),
    ("0", WRONG, "direct"),
    ("09", BAD, None),
    ("9.", BAD, None),
    ("-9", BAD, None),
    ("7+5=12,12-3=9", OK, "cot"),
    ("7+5=12,12-3=8", WRONG, "cot"),      # last step off by one
    ("7+5=12,12-3=10", WRONG, "cot"),
    ("7+5=13,13-3=10", WRONG, "cot"),     # first step off by one, carried through
    ("7+5=13,12-3=9", WRONG, "cot"),      # a wrong intermediate with the right answer
    ("7+5=12,12-2=10", WRONG, "cot"),     # wrong operand
    ("7+5=12,12+3=15", WRONG, "cot"),     # wrong operator
    ("5+7=12,12-3=9", WRONG, "cot"),      # steps follow the prompt left to right
    ("7+5=12", WRONG, "cot"),             # too few steps
    ("7+5=12,12-3=9,9+0=9", WRONG, "cot"),
    ("7+5=12;12-3=9", BAD, None),
    ("7+5=12, 12-3=9", BAD, None),
    ("7*5=35,35-3=32", BAD, None),
    ("x=7;x+=5;x-=3;print(x)", OK, "code"),
    ("x=7;x+=5;x-=4;print(x)", WRONG, "code"),   # one off in either direction
    ("x=7;x+=5;x-=2;print(x)", WRONG, "code"),
    ("x=7;x-=5;x+=3;print(x)", WRONG, "code"),   # the operators swapped
    ("x=8;x+=5;x-=3;print(x)", WRONG, "code"),
    ("x=9;print(x)", OK, "code"),                # the program is run: its output is the answer
    ("x=7;x+=5;x-=3", BAD, None),
    ("x=7;x+=5;x-=3;print(y)", BAD, None),
    ("x=7;x*=5;print(x)", BAD, None),
    ("x=7;x+=05;print(x)", BAD, None),
    ("x=7;;print(x)", BAD, None),
    ("x=;print(x)", BAD, None),
    ("print(x)", BAD, None),
    ("", BAD, None),
])
def test_arith_near_misses_every_format(text, expect, fmt):
    check(ARITH, A, text, expect, fmt)


def test_arith_solver_and_parameters():
    for fmt, text in (("direct", "9"), ("cot", "7+5=12,12-3=9"), ("code", "x=7;x+=5;x-=3;print(x)")):
        assert ARITH.solve(A, fmt) == text
    import random

    rng = random.Random(0)
    t = build_task("arith", {"n_ops": 1, "n_ops_ood": 4, "max_operand": 3})
    for split, n in (("id", 1), ("ood", 4)):
        for _ in range(30):
            p = t.sample(rng, split)
            assert len(p.data["ops"]) == n and all(1 <= x <= 3 for x in p.data["nums"]) and p.data["answer"] >= 0
            for fmt in t.formats:
                assert t.verify(p, t.solve(p, fmt)).correct
    for params in ({"n_ops": 0}, {"n_ops": 9}, {"n_ops_ood": 0}, {"n_ops_ood": 9}, {"max_operand": 1},
                   {"max_operand": 10_001}):
        with pytest.raises(UserError, match="arith"):
            build_task("arith", params)
    build_task("arith", {"n_ops": 8, "n_ops_ood": 1, "max_operand": 10_000})
    build_task("arith", {"max_operand": 2})


# ---- facts ---------------------------------------------------------------------------------------

def test_facts_near_misses():
    t = build_task("facts")
    p = Problem("facts", "id", "fact color of zubo:", {"answer": "red", "relation": "color"})
    check(t, p, "red", OK, "default")
    for other in ("blue", "pink", "gold"):  # another valid colour: wrong, not malformed
        check(t, p, other, WRONG, "default")
    for text in ("oslo", "cat", "Red", "red ", "re", "", "redd"):  # not a colour
        check(t, p, text, BAD, None)
    city = Problem("facts", "id", "fact city of zubo:", {"answer": "oslo", "relation": "city"})
    check(t, city, "oslo", OK, "default")
    check(t, city, "rome", WRONG, "default")
    check(t, city, "red", BAD, None)


def test_facts_knowledge_base_and_parameters():
    t = build_task("facts", {"n_entities": 4, "relations": ["pet"], "kb_seed": 7})
    kb = t.kb
    assert len(kb) == 4 and len({e for e, _, _ in kb}) == 4
    assert all(len(e) == 4 and e[0] in "bdfgklmnprstvz" and e[1] in "aeiou" for e, _, _ in kb)
    assert kb == build_task("facts", {"n_entities": 4, "relations": ["pet"], "kb_seed": 7}).kb
    assert kb != build_task("facts", {"n_entities": 4, "relations": ["pet"], "kb_seed": 8}).kb
    for p, (e, rel, v) in zip(t.all_problems(), kb):
        assert p.prompt == f"fact {rel} of {e}:" and t.verify(p, t.solve(p, "default")).correct
    import random

    p = t.sample(random.Random(0), "id")
    assert (p.prompt[len("fact pet of "):-1], "pet", p.data["answer"]) in kb
    for params in ({"relations": ["height"]}, {"relations": []}, {"n_entities": 0}, {"n_entities": 2001}):
        with pytest.raises(UserError, match="facts"):
            build_task("facts", params)
    build_task("facts", {"n_entities": 2000})
    build_task("facts", {"n_entities": 1})


# ---- strings -------------------------------------------------------------------------------------

def test_strings_near_misses():
    t = build_task("strings")
    p = Problem("strings", "id", "str rev abcd:", {"answer": "dcba"})
    check(t, p, "dcba", OK, "default")
    for text in ("dcb", "dcbaa", "abcd", "dbca", "cba", "dcbb"):
        check(t, p, text, WRONG, "default")
    for text in ("", "dcbz", "DCBA", "dcb a", "dcba\n"):  # outside the alphabet a..j
        check(t, p, text, BAD, None)


def test_strings_sampling_and_parameters():
    import random

    t = build_task("strings", {"min_len": 2, "max_len": 3, "ood_len": 5, "alphabet": "ab"})
    rng = random.Random(0)
    for split, (lo, hi) in (("id", (2, 3)), ("ood", (4, 5))):
        lengths = set()
        for _ in range(60):
            p = t.sample(rng, split)
            op, s = p.prompt[4:-1].split(" ")
            lengths.add(len(s))
            assert set(s) <= {"a", "b"} and p.data["answer"] == {"rev": s[::-1], "sort": "".join(sorted(s)), "copy": s}[op]
            assert t.verify(p, t.solve(p, "default")).correct
        assert lengths == set(range(lo, hi + 1))
    for params in ({"min_len": 0}, {"min_len": 4, "max_len": 3}, {"max_len": 8, "ood_len": 8}, {"ood_len": 41},
                   {"alphabet": ""}, {"alphabet": "aB"}):
        with pytest.raises(UserError, match="strings"):
            build_task("strings", params)
    build_task("strings", {"min_len": 1, "max_len": 1, "ood_len": 40})


def test_task_errors_name_the_task_and_the_value():
    import random

    with pytest.raises(UserError, match=r"^strings: alphabet must be non-empty lowercase ascii letters$"):
        build_task("strings", {"alphabet": "aB"})
    with pytest.raises(UserError, match=r"^points24: n_cards must be in 2\.\.5, got 1$"):
        build_task("points24", {"n_cards": 1})
    with pytest.raises(UserError, match=r"^points24: no solvable hand found for n_cards=2, target=200$"):
        build_task("points24", {"n_cards": 2, "target": 200, "max_tries": 5}).sample(random.Random(0), "id")
    with pytest.raises(UserError, match=r"^arith: max_operand must be in 2\.\.10000, got 1$"):
        build_task("arith", {"max_operand": 1})
    with pytest.raises(UserError, match=r"^facts: unknown relations \['height'\] \(known: color, city, pet\)$"):
        build_task("facts", {"relations": ["height"]})


def test_arith_samples_are_what_their_prompt_says():
    import random

    rng = random.Random(1)
    t = build_task("arith")  # defaults: 2 operations in-domain, 3 out of domain, operands 1..12
    seen, zero_seen = set(), False
    for split, n_ops in (("id", 2), ("ood", 3)):
        for _ in range(300):
            p = t.sample(rng, split)
            nums, ops = p.data["nums"], p.data["ops"]
            assert (p.task, p.split, len(ops), len(nums)) == ("arith", split, n_ops, n_ops + 1)
            assert p.prompt == "arith " + str(nums[0]) + "".join(f"{o}{x}" for o, x in zip(ops, nums[1:])) + ":"
            value = nums[0]
            for o, x in zip(ops, nums[1:]):
                value = value + x if o == "+" else value - x
                assert value >= 0
                zero_seen |= value == 0
            assert p.data["answer"] == value
            seen.update(nums)
    assert seen == set(range(1, 13)) and zero_seen  # a chain may pass through 0
    with pytest.raises(UserError, match="no split"):
        t.sample(rng, "test")
    build_task("arith", {"n_ops_ood": 8})
