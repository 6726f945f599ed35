"""The dataset-task checkers by hand: each option of exact, regex, numeric and math_verify changes a
verdict it should, and nothing else."""

import pytest

from posttrain.tasks.verifiers import Exact, GoldError, MathVerify, Numeric, Regex


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
