"""The findings registry and verdict plumbing of posttrain/findings/__init__.py, and the mid-layer
helpers of findings/weights.py, on toy findings and hand-made numbers (mutation survivors)."""

import pytest

import posttrain.findings as fmod
from posttrain.config import StudyConfig
from posttrain.findings import (NOISE_RULE, Finding, Measured, aggregate_findings, evaluate_findings, finding,
                                t975)
from posttrain.findings.weights import mid_layer_mlp, mid_layer_mlp_share, mid_layers
from test_findings import seed_row


@pytest.fixture
def only(monkeypatch):
    """Run evaluate_findings over toy findings only (the registry is module state)."""
    table: dict = {}
    monkeypatch.setattr(fmod, "FINDINGS", table)
    return table


def test_finding_decorator_records_id_claim_rule_paper_and_noise_rule(only):
    def rule(ctx):
        return True, "ok"

    assert finding("toy_noisy", "A beats B.", paper="arXiv 0000.00000", noisy=True)(rule) is rule
    assert only["toy_noisy"] == Finding("toy_noisy", f"A beats B. {NOISE_RULE}", rule, "arXiv 0000.00000", True)
    finding("toy_plain", "C holds.")(rule)
    assert only["toy_plain"] == Finding("toy_plain", "C holds.", rule, "", False)
    with pytest.raises(ValueError, match=r"^finding 'toy_plain' registered twice$"):
        finding("toy_plain", "again")(rule)
    assert only["toy_plain"].claim == "C holds."


def test_evaluate_findings_passes_a_rules_statistics_through(only):
    finding("toy_stats", "KL predicts forgetting.")(lambda ctx: (True, "rho 0.9", {"rho": 0.9, "r2": 0.7}))
    finding("toy_two", "No statistics.")(lambda ctx: (False, "nothing"))
    finding("toy_measured", "A beats B.", noisy=True)(lambda ctx: Measured(0.30, 0.10, 0.05, "0.30 vs 0.10"))
    out = evaluate_findings({"models": {"base": {}}, "forgetting": {}, "diagnostics": {}}, StudyConfig())
    assert out[0] == {"id": "toy_stats", "claim": "KL predicts forgetting.", "holds": True, "evidence": "rho 0.9",
                      "rho": 0.9, "r2": 0.7, "held_in": "1/1"}
    assert out[1] == {"id": "toy_two", "claim": "No statistics.", "holds": False, "evidence": "nothing",
                      "held_in": "0/1"}
    assert out[2]["holds"] is True and out[2]["value"] == 0.30 and out[2]["se"] == 0.05


def _seed(value, threshold):
    return [seed_row("x", None, f"{value} vs {threshold}", value=value, threshold=threshold)]


def test_aggregate_margin_interval_edges():
    # every margin exactly 0: the interval is [0, 0], which neither lies above nor below 0
    tie = aggregate_findings({0: _seed(0.2, 0.2), 1: _seed(0.3, 0.3)})[0]
    assert tie["holds"] is None and tie["margin_ci95"] == [0.0, 0.0]
    # an interval that straddles 0 and ends below 1 is within noise, not "does not hold"
    straddle = aggregate_findings({i: _seed(m, 0.0) for i, m in enumerate((-0.02, 0.0, 0.02, 0.04, 0.06))})[0]
    lo, hi = straddle["margin_ci95"]
    assert lo < 0 < hi < 1 and straddle["holds"] is None
    # the threshold reported is the first seed's
    assert aggregate_findings({0: _seed(0.9, 0.1), 1: _seed(0.8, 0.2)})[0]["threshold"] == 0.1


def test_t975_refuses_zero_degrees_of_freedom():
    with pytest.raises(ValueError, match=r"^a t-interval needs at least 2 values$"):
        t975(0)


def test_mid_layers_and_the_mid_layer_mlp_helpers_on_edge_shapes():
    assert mid_layers(0) == range(0, 1) and mid_layers(1) == range(0, 1) and mid_layers(6) == range(2, 4)
    assert mid_layer_mlp({}) is None and mid_layer_mlp({"rel_update_by_layer_module": {}}) is None
    # one layer: it is the middle third
    one = {"update_sq_by_layer_module": {"q_proj": [3.0], "down_proj": [1.0]}}
    assert mid_layer_mlp_share(one) == pytest.approx(0.25)
    # a module whose per-layer list is shorter than the model's counts the layers it has
    ragged = {"update_sq_by_layer_module": {"q_proj": [1.0, 1.0, 1.0], "up_proj": [2.0]}}
    assert mid_layer_mlp_share(ragged) == 0.0
    ragged2 = {"update_sq_by_layer_module": {"q_proj": [1.0, 1.0, 1.0], "up_proj": [2.0, 4.0]}}
    assert mid_layer_mlp_share(ragged2) == pytest.approx(4.0 / 9.0)
