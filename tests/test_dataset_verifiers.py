"""The dataset-task checkers by hand: each option of exact, regex, numeric and math_verify changes a
verdict it should, and nothing else."""

from fractions import Fraction

import pytest

from posttrain.tasks.verifiers import (Countdown, Exact, GoldError, MathVerify, Numeric, Regex, _as_math, _timeout,
                                      close_enough, fill_pattern)


def exact(**kw):
    return Exact(type="exact", **kw)


def test_exact_normalisations_each_do_their_one_thing():
    assert exact().check("  42 ", "42", {}, False) is True  # strip is on by default
    assert exact(strip=False).check(" 42", "42", {}, False) is False
    assert exact().check("ABC", "abc", {}, False) is False and exact(lower=True).check("ABC", "abc", {}, False) is True
    assert exact().check("a   b", "a b", {}, False) is False
    assert exact(collapse_whitespace=True).check("a \t\n b", "a b", {}, False) is True
    assert exact().check("$1,000", "1000", {}, False) is False and exact(remove=",$").check("$1,000", "1000", {}, False)
    # the reference is normalised too, and the order is remove, collapse, strip, lower
    assert exact(remove="x", lower=True).normalize(" xAx ") == "a"
    assert exact(collapse_whitespace=True, lower=True).normalize("\tA\n  B ") == "a b"
    assert exact(strip=False, collapse_whitespace=True).normalize("  a  ") == " a "
    # nothing left to compare: no readable answer
    assert exact().check("   ", "x", {}, False) is None and exact(remove="x").check("xx", "y", {}, False) is None


def test_regex_options():
    rx = Regex(type="regex", pattern="{answer}")
    assert rx.check("42", "42", {}, False) is True and rx.check("x 42 y", "42", {}, False) is False
    assert Regex(type="regex", pattern="{answer}", fullmatch=False).check("x 42 y", "42", {}, False) is True
    assert rx.check("ABC", "abc", {}, False) is False
    assert Regex(type="regex", pattern="{answer}", ignore_case=True).check("ABC", "abc", {}, False) is True
    # the answer and row fields are matched literally, other braces are regex syntax
    assert Regex(type="regex", pattern=r"{unit}\d{2}").check("kg42", None, {"unit": "kg"}, False) is True
    assert Regex(type="regex", pattern="{answer}").check("1x5", "1.5", {}, False) is False
    assert Regex(type="regex", pattern="{answer} {unit}").fields() == {"unit"}
    assert Regex(type="regex", pattern="{a}{b}{answer}").fields() == {"a", "b"}


def test_numeric_reads_the_reference_or_blames_it():
    num = Numeric(type="numeric", abs_tol=0.01)
    assert num.check("3.005", "3", {}, False) is True and num.check("3.02", "3", {}, False) is False
    assert num.check("three", "3", {}, False) is None
    with pytest.raises(GoldError, match="the reference answer 'three' is not a number"):
        num.check("3", "three", {}, False)


def test_math_verify_equivalence_rounding_and_readability():
    mv = MathVerify(type="math_verify")
    assert mv.check("\\frac{1}{2}", "0.5", {}, False) is True and mv.check("2", "3", {}, False) is False
    assert mv.check("the answer is \\boxed{4}", "4", {}, True) is True
    assert mv.check("", "4", {}, False) is None
    # float_rounding reaches the comparison: 0.333 is 1/3 to 2 decimals, not to the default 6
    assert mv.check("0.333", "1/3", {}, False) is False
    assert MathVerify(type="math_verify", float_rounding=2).check("0.333", "1/3", {}, False) is True
    with pytest.raises(GoldError, match="cannot read the reference answer ''"):
        mv.check("1", "", {}, False)


def test_math_verify_strict_mode_reaches_the_comparison():
    # strict (the default): a different variable is a different answer; non-strict math-verify
    # lets the symbols differ
    assert MathVerify(type="math_verify").check("y", "x", {}, False) is False
    assert MathVerify(type="math_verify", strict=False).check("y", "x", {}, False) is True


def test_math_verify_wraps_a_bare_answer_in_dollars():
    mv = MathVerify(type="math_verify")
    # bare, math-verify reads neither `\sqrt{2}` nor `\pi`; inside $...$ it does
    assert mv.check("\\sqrt{2}", "\\sqrt{2}", {}, False) is True
    assert mv.check("\\sqrt{3}", "\\sqrt{2}", {}, False) is False
    # bare `2\pi` would read as 2
    assert mv.check("2", "2\\pi", {}, False) is False
    # the whole completion is searched as it is, not wrapped: `\sqrt{2}` alone is unreadable
    assert mv.check("\\sqrt{2}", "\\sqrt{2}", {}, True) is None
    # text with its own delimiters or a box is left as it is
    assert _as_math("\\sqrt{2}") == "$\\sqrt{2}$"
    assert _as_math("$\\sqrt{2}$") == "$\\sqrt{2}$" and _as_math("x $y") == "x $y"
    assert _as_math("\\boxed{4}") == "\\boxed{4}" and _as_math("so \\boxed{4}.") == "so \\boxed{4}."


def test_math_verify_passes_its_timeout_to_every_parse_and_comparison(monkeypatch):
    import math_verify

    calls = []
    real_parse, real_verify = math_verify.parse, math_verify.verify

    def parse(text, **kw):
        calls.append(("parse", text, kw))
        return real_parse(text, **kw)

    def verify(gold, pred, **kw):
        calls.append(("verify", kw))
        return real_verify(gold, pred, **kw)

    monkeypatch.setattr(math_verify, "parse", parse)
    monkeypatch.setattr(math_verify, "verify", verify)
    # a gold text of its own: the parsed reference answers are cached
    assert MathVerify(type="math_verify", timeout_seconds=3).check("7/8", "\\frac{7}{8}", {}, False) is True
    assert calls == [("parse", "$\\frac{7}{8}$", {"parsing_timeout": 3}), ("parse", "$7/8$", {"parsing_timeout": 3}),
                     ("verify", {"float_rounding": 6, "strict": True, "timeout_seconds": 3})]
    assert _timeout(3) == 3 and _timeout(0) == 0


def test_math_verify_works_off_the_main_thread():
    # SIGALRM timeouts only work in the main thread: elsewhere the check runs without one instead
    # of math-verify raising
    from concurrent.futures import ThreadPoolExecutor

    mv = MathVerify(type="math_verify")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(_timeout, 5).result() is None
        assert pool.submit(mv.check, "\\frac{2}{3}", "4/6", {}, False).result() is True
        assert pool.submit(mv.check, "\\frac{2}{5}", "4/6", {}, False).result() is False


def test_fill_pattern_escapes_known_names_and_keeps_other_braces():
    assert fill_pattern("{answer} {unit}", {"answer": "1.5", "unit": "kg"}) == "1\\.5 kg"
    assert fill_pattern("{answer}!", {"answer": 3}) == "3!"
    # a name the values lack stays as written, braces included; so does regex syntax
    assert fill_pattern("{answer} {other} \\d{2,3}", {"answer": "x"}) == "x {other} \\d{2,3}"


def test_close_enough_scales_the_relative_tolerance_by_the_reference():
    # 0 + 0.1 * |-20| = 2: -18 is inside, -17.9 is not (with |ref| the sign of ref cannot shrink it)
    assert close_enough(Fraction(-18), Fraction(-20), 0.0, 0.1)
    assert not close_enough(Fraction(-179, 10), Fraction(-20), 0.0, 0.1)
    # relative to the reference, not to the answer: 0.1 * 100 = 10 admits 110 but not 110.5
    assert close_enough(Fraction(110), Fraction(100), 0.0, 0.1)
    assert not close_enough(Fraction(1105, 10), Fraction(100), 0.0, 0.1)
    assert close_enough(Fraction(100), Fraction(110), 0.0, 0.1)  # 10 <= 11


@pytest.mark.parametrize("row, message", [
    ({"target": 8}, "field 'nums' is not a list of integers: None"),
    ({"nums": [], "target": 8}, "field 'nums' is not a list of integers: \\[\\]"),
    ({"nums": (3, 5), "target": 8}, "field 'nums' is not a list of integers: \\(3, 5\\)"),
    ({"nums": [3.0, 5], "target": 8}, "field 'nums' is not a list of integers: \\[3.0, 5\\]"),
    ({"nums": [True, 5], "target": 6}, "field 'nums' is not a list of integers: \\[True, 5\\]"),
    ({"nums": [3, 5]}, "field 'target' is not an integer: None"),
    ({"nums": [3, 5], "target": "8"}, "field 'target' is not an integer: '8'"),
    ({"nums": [3, 5], "target": True}, "field 'target' is not an integer: True"),
])
def test_countdown_blames_a_row_without_integer_numbers_or_target(row, message):
    with pytest.raises(GoldError, match=f"^{message}$"):
        Countdown(type="countdown").check("3+5", None, row, False)


def test_countdown_reads_the_fields_it_is_told_to():
    cd = Countdown(type="countdown", numbers="cards", target="goal")
    assert cd.fields() == {"cards", "goal"}
    assert cd.check("3+5", None, {"cards": [3, 5], "goal": 8}, False) is True
    assert cd.check("3*5", None, {"cards": [3, 5], "goal": 8, "nums": [3, 5], "target": 15}, False) is False


def test_close_enough_includes_the_boundary():
    # binary-exact tolerances: 0.5 + 0.25 * 10 = 3, so 13 and 7 are exactly on the boundary
    assert close_enough(Fraction(13), Fraction(10), 0.5, 0.25) and close_enough(Fraction(7), Fraction(10), 0.5, 0.25)
    assert not close_enough(Fraction(1301, 100), Fraction(10), 0.5, 0.25)


def test_countdown_reads_expressions_up_to_256_characters():
    cd = Countdown(type="countdown")
    ok = "(" * 125 + "3*5+12" + ")" * 125  # 256 characters
    assert len(ok) == 256 and cd.check(ok + "=27", None, {"nums": [3, 5, 12], "target": 27}, False) is True
    long = "(" * 126 + "3*5+7" + ")" * 126  # 257
    assert len(long) == 257 and cd.check(long, None, {"nums": [3, 5, 7], "target": 22}, False) is None
