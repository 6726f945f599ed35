"""The diagnostics table (posttrain/analysis/diagnostics.py) on small hand-built tables.

Every expected aggregate below is computed by hand from the docstring's formulas:
norm_ratio = sqrt(sum num^2) / sqrt(sum den^2) per bucket, numel_weighted = sum(v * numel) / sum(numel),
sum_sq = sum v^2, mean = unweighted mean of the bucket's matrices; buckets are the whole model, a module
type (in MODULE_ORDER), a layer and a layer x module cell; layer-less tensors (embeddings) count only in
the total and their module.
"""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest

from posttrain.analysis import diagnostics as D
from posttrain.analysis.diagnostics import Aggregate, Diagnostic

NAN = float("nan")


def _nested(got, want, leaf) -> bool:
    """Nested lists/dicts equal in shape and key order, NaN equal to NaN (and only to NaN: None is not
    NaN), other leaves compared by `leaf`."""
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and all(_nested(got[k], want[k], leaf) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(_nested(g, w, leaf) for g, w in zip(got, want))
    if isinstance(want, float) and math.isnan(want):
        return isinstance(got, float) and math.isnan(got)
    return leaf(got, want)


def same(got, want) -> bool:
    """Exact equality, leaf types included."""
    return _nested(got, want, lambda g, w: type(g) is type(w) and g == w)


def close(got, want) -> bool:
    """Like `same`, floats to 1e-12 relative."""
    return _nested(got, want, lambda g, w: isinstance(g, float) and g == pytest.approx(w, rel=1e-12)
                   if isinstance(w, float) else g == w and type(g) is type(w))


# ------------------------------------------------------------------------------------------------
# the streamed columns: norm_ratio, sum_sq, numel_weighted through summarise_rows


def stream_rows() -> pd.DataFrame:
    # appearance order (embed, down_proj, q_proj) and alphabetical order (down_proj, embed, q_proj) both
    # differ from MODULE_ORDER (q_proj, down_proj, embed); layer 2 of 3 has no tensor
    return pd.DataFrame([
        dict(name="embed", module="embed", layer=None, numel=10, base_norm=4.0, delta_norm=3.0, changed_frac=0.1),
        dict(name="l0.down", module="down_proj", layer=0, numel=6, base_norm=0.0, delta_norm=2.0, changed_frac=0.25),
        dict(name="l0.q", module="q_proj", layer=0, numel=4, base_norm=3.0, delta_norm=4.0, changed_frac=0.5),
        dict(name="l1.down", module="down_proj", layer=1, numel=2, base_norm=2.0, delta_norm=1.0, changed_frac=1.0),
        dict(name="l1.q", module="q_proj", layer=1, numel=2, base_norm=1.0, delta_norm=2.0, changed_frac=0.0),
    ]).assign(unchanged_frac=lambda df: 1.0 - df["changed_frac"])


def inputs(rows=None, matrices=None, curves=None, spectra=None, n_layers=3, spectra_for=None) -> D.SummaryInputs:
    return D.SummaryInputs(rows=stream_rows() if rows is None else rows,
                           matrices=pd.DataFrame() if matrices is None else matrices,
                           curves=curves, spectra=spectra, n_layers=n_layers, spectra_for=spectra_for)


def test_stream_aggregates_by_hand():
    out = D.summarise_rows(inputs())
    # only the streamed diagnostics aggregate without a per-matrix pass
    assert sorted(out) == sorted([
        "rel_update_total", "rel_update_by_module", "rel_update_by_layer", "rel_update_by_layer_module",
        "update_sq", "update_sq_by_layer_module",
        "changed_frac", "changed_frac_by_module", "unchanged_frac", "unchanged_frac_by_module"])
    # relative update: num = delta^2 = 9, 4, 16, 1, 4; den = base^2 = 16, 0, 9, 4, 1
    assert close(out["rel_update_total"], math.sqrt(34) / math.sqrt(30))
    assert close(out["rel_update_by_module"], {"q_proj": math.sqrt(20) / math.sqrt(10),
                                               "down_proj": math.sqrt(5) / 2.0, "embed": 0.75})
    # layer 2 has no tensor: nan; the embedding is in no layer
    assert close(out["rel_update_by_layer"], [math.sqrt(20) / 3.0, 1.0, NAN])
    # cell (0, down_proj) has a zero base: nan, not a division by zero; an empty cell is None
    assert close(out["rel_update_by_layer_module"], {"q_proj": [4 / 3, 2.0, None], "down_proj": [NAN, 0.5, None]})
    # update energy sum ||dW||^2
    assert close(out["update_sq"], 34.0)
    assert close(out["update_sq_by_layer_module"], {"q_proj": [16.0, 4.0, None], "down_proj": [4.0, 1.0, None]})
    # shares of entries: numel 10, 6, 4, 2, 2
    assert close(out["changed_frac"], (1.0 + 1.5 + 2.0 + 2.0 + 0.0) / 24)
    assert close(out["changed_frac_by_module"], {"q_proj": 2.0 / 6, "down_proj": 3.5 / 8, "embed": 0.1})
    assert close(out["unchanged_frac"], (9.0 + 4.5 + 2.0 + 0.0 + 2.0) / 24)
    assert close(out["unchanged_frac_by_module"], {"q_proj": 4.0 / 6, "down_proj": 4.5 / 8, "embed": 0.9})


def test_stream_aggregate_skipped_when_its_column_is_missing():
    out = D.summarise_rows(inputs(rows=stream_rows().drop(columns=["unchanged_frac"])))
    assert "unchanged_frac" not in out and "unchanged_frac_by_module" not in out
    assert close(out["changed_frac"], 6.5 / 24)


def test_sum_sq_of_an_empty_layer_is_nan_not_zero():
    a = Aggregate("toy_sq", value="delta_norm", how="sum_sq", scopes=("total", "layer", "module"))
    out = D._ratio_aggregate(stream_rows(), a, 3)
    assert same(out, {"toy_sq": 34.0, "toy_sq_by_layer": [16.0 + 4.0, 1.0 + 4.0, NAN],
                      "toy_sq_by_module": {"q_proj": 20.0, "down_proj": 5.0, "embed": 9.0}})


def test_numel_weighted_guards_empty_buckets():
    rows = pd.DataFrame([
        dict(module="q_proj", layer=0, numel=3, x=0.5),
        dict(module="q_proj", layer=1, numel=1, x=0.25),  # a one-entry tensor: its own value
        dict(module="norm", layer=0, numel=0, x=0.75),  # an empty tensor: weight 0, so nan
    ])
    a = Aggregate("x", how="numel_weighted", scopes=("total", "module", "layer", "cell"))
    out = D._ratio_aggregate(rows, a, 2)
    assert same(out, {"x": 1.75 / 4, "x_by_module": {"q_proj": 1.75 / 4, "norm": NAN},
                      "x_by_layer": [0.5, 0.25],
                      "x_by_layer_module": {"q_proj": [0.5, 0.25], "norm": [NAN, None]}})


def test_bucket_keys():
    r = next(pd.DataFrame([dict(module="q_proj", layer=2.0)]).itertuples())
    assert D.bucket_keys(r) == ["total", ("module", "q_proj"), ("layer", 2), ("cell", 2, "q_proj")]
    for missing in (None, NAN):
        r = next(pd.DataFrame([dict(module="embed", layer=missing)], dtype=object).itertuples())
        assert D.bucket_keys(r) == ["total", ("module", "embed")]


# ------------------------------------------------------------------------------------------------
# per-matrix means


def matrices() -> pd.DataFrame:
    return pd.DataFrame([
        dict(name="embed", module="embed", layer=None, v=10.0),
        dict(name="l0.down", module="down_proj", layer=0, v=4.0),
        dict(name="l0.q", module="q_proj", layer=0, v=1.0),
        dict(name="l1.q", module="q_proj", layer=1, v=3.0),
        dict(name="l1.down", module="down_proj", layer=1, v=NAN),  # a matrix without this metric
    ])


def test_mean_aggregate_by_hand():
    a = Aggregate("m", value="v", scopes=("total", "module", "layer", "cell"))
    out = D._mean_aggregate(matrices(), a, 3)
    assert same(out, {"m": 4.5, "m_by_module": {"q_proj": 2.0, "down_proj": 4.0, "embed": 10.0},
                      "m_by_layer": [2.5, 3.0, None],
                      "m_by_layer_module": {"q_proj": [1.0, 3.0, None], "down_proj": [4.0, None, None]}})


def test_mean_aggregate_layer_scope_alone_and_all_missing():
    out = D._mean_aggregate(matrices(), Aggregate("m", value="v", scopes=("layer",)), 2)
    assert same(out, {"m_by_layer": [2.5, 3.0]})
    none = matrices().assign(v=NAN)
    out = D._mean_aggregate(none, Aggregate("m", value="v", scopes=("total", "module", "layer", "cell")), 2)
    assert same(out, {"m": NAN, "m_by_module": {}, "m_by_layer": [None, None], "m_by_layer_module": {}})


def test_builtin_alpha_means_through_summarise_rows():
    # scan gives every matrix every per-matrix column, nan where a diagnostic did not run
    mat = matrices().rename(columns={"v": "alpha_ft"}).assign(alpha_base=[1.0, 2.0, 3.0, 4.0, 5.0])
    mat = mat.assign(**{c: NAN for c in D.matrix_columns() if c not in mat.columns})
    out = D.summarise_rows(inputs(matrices=mat, n_layers=2))
    assert same(out["alpha_by_layer"], [2.5, 3.0])
    assert same(out["alpha_by_module"], {"q_proj": 2.0, "down_proj": 4.0, "embed": 10.0})
    assert same(out["alpha_base_by_layer"], [2.5, 4.5])
    assert same(out["alpha_base_by_module"], {"q_proj": 3.5, "down_proj": 3.5, "embed": 1.0})
    # whole-table summaries run once there are matrices: no curves, no spectra
    assert out["angle_curve"] == {"x": [(i + 0.5) / D.CURVE_POINTS for i in range(D.CURVE_POINTS)],
                                  "left": [], "right": []}
    assert out["spectra"] == {}


def test_both_sides_is_nan_when_either_side_is_missing():
    df = pd.DataFrame({"a_left": [1.0, 2.0, NAN], "a_right": [3.0, NAN, 5.0], "a_other": [7.0, 7.0, 7.0]})
    got = D._both_sides("a")(df)
    assert isinstance(got, pd.Series)
    assert same(got.tolist(), [2.0, NAN, NAN])


# ------------------------------------------------------------------------------------------------
# the angle curve and the chosen spectra


def test_mean_angle_curve_resamples_and_averages():
    curves = pd.DataFrame([
        # matrix B first, its points unsorted: angle 4 up to x = 0.5, then down to 0 at x = 1
        dict(name="B", side="left", x=1.0, angle=0.0), dict(name="B", side="left", x=0.0, angle=4.0),
        dict(name="B", side="left", x=0.5, angle=4.0),
        # matrix A: angle 8x on the left, constant 2 on the right
        dict(name="A", side="left", x=1.0, angle=8.0), dict(name="A", side="left", x=0.0, angle=0.0),
        dict(name="A", side="right", x=0.0, angle=2.0), dict(name="A", side="right", x=1.0, angle=2.0),
    ])
    out = D.mean_angle_curve(curves, points=4)
    # x = 0.125, 0.375, 0.625, 0.875: A -> 1, 3, 5, 7; B -> 4, 4, 3, 1
    assert out == {"x": [0.125, 0.375, 0.625, 0.875], "left": [2.5, 3.5, 4.0, 4.0], "right": [2.0, 2.0, 2.0, 2.0]}
    # a side with no curve is empty, not nan
    assert D.mean_angle_curve(curves[curves["side"] == "left"], points=4)["right"] == []


def test_mean_angle_curve_without_curves():
    want = {"x": [0.25, 0.75], "left": [], "right": []}
    assert D.mean_angle_curve(None, points=2) == want
    assert D.mean_angle_curve(pd.DataFrame(columns=["name", "side", "x", "angle"]), points=2) == want


def spectra_table() -> pd.DataFrame:
    return pd.DataFrame([
        dict(name="m1", layer=0, module="q_proj", sv_base=[4.0, 2.0, 1.0, 0.5, 0.0], sv_ft=[5.0, 2.0, 1.5, 0.25, 0.5]),
        dict(name="m2", layer=1, module="q_proj", sv_base=[1.0, 0.0], sv_ft=[1.0, 0.0]),
        dict(name="m3", layer=2, module="q_proj", sv_base=[9.0], sv_ft=[9.0]),
    ])


def test_chosen_spectra_thins_keeping_top_and_bottom():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero base values must not warn (x / 0 and 0 / 0)
        out = D.chosen_spectra(spectra_table(), ["m1", "m2"], points=3)
    # m1: 5 values thinned to indices 0, 2, 4; m2: 2 values kept whole; rel_change nan where the base is 0
    assert same(out, {
        "m1": {"index": [0, 2, 4], "base": [4.0, 1.0, 0.0], "ft": [5.0, 1.5, 0.5], "rel_change": [0.25, 0.5, NAN]},
        "m2": {"index": [0, 1], "base": [1.0, 0.0], "ft": [1.0, 0.0], "rel_change": [0.0, NAN]},
    })


def test_chosen_spectra_defaults_and_empty():
    assert D.chosen_spectra(None) == {}
    assert D.chosen_spectra(pd.DataFrame()) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = D.chosen_spectra(spectra_table())  # default names: first, middle and last q_proj layer
    assert list(out) == ["m1", "m2", "m3"]
    assert out["m1"]["index"] == [0, 1, 2, 3, 4]
    assert same(out["m3"], {"index": [0], "base": [9.0], "ft": [9.0], "rel_change": [0.0]})


def test_default_spectra_names_first_middle_last_of_q_and_down():
    rows = [dict(name="k.0", module="k_proj", layer=0), dict(name="embed", module="embed", layer=None)]
    rows += [dict(name=f"q.{i}", module="q_proj", layer=i) for i in (3, 0, 4, 1, 2)]
    rows += [dict(name=f"down.{i}", module="down_proj", layer=i) for i in range(4)]
    # q_proj: 5 layers -> 0, 2, 4; down_proj: 4 layers -> 0, 2, 3
    assert D.default_spectra_names(pd.DataFrame(rows)) == ["q.0", "q.2", "q.4", "down.0", "down.2", "down.3"]


def test_default_spectra_names_falls_back_to_the_first_two_modules():
    df = pd.DataFrame([
        dict(name="embed", module="embed", layer=None),  # layer-less: never chosen
        dict(name="up.0", module="up_proj", layer=0),
        dict(name="o.1", module="o_proj", layer=1), dict(name="o.0", module="o_proj", layer=0),
        dict(name="gate.0", module="gate_proj", layer=0),
    ])
    assert D.default_spectra_names(df) == ["up.0", "o.0", "o.1"]
    # a single layer is named once
    assert D.default_spectra_names(df, modules=("gate_proj",)) == ["gate.0"]


# ------------------------------------------------------------------------------------------------
# the table itself: keys, registration, trajectory entries


def test_summary_keys():
    a = Aggregate("k")
    assert [a.summary_key(s) for s in D.SCOPES] == ["k", "k_by_module", "k_by_layer", "k_by_layer_module"]
    assert Aggregate("k", total_key="k_total").summary_key("total") == "k_total"
    # a whole-table summary has one key whatever the scope
    f = Aggregate("w", how=lambda i: 0, scopes=("module",), total_key="w_all")
    assert [f.summary_key(s) for s in D.SCOPES] == ["w_all"] * 4


def test_stream_columns_and_results_keys():
    assert D.stream_columns() == ["base_norm", "delta_norm", "rel_update", "changed_frac", "unchanged_frac"]
    keys = D.results_keys()
    assert keys[:6] == ["rel_update_total", "rel_update_by_module", "rel_update_by_layer",
                        "rel_update_by_layer_module", "update_sq", "update_sq_by_layer_module"]
    assert "changed_frac_by_module" not in keys and "alpha_by_layer" not in keys


def test_trajectory_values():
    summary = {"rel_update_total": 0.3, "rel_update_by_module": {"q_proj": 0.2, "embed": 0.1},
               "rel_update_by_layer": [0.5], "changed_frac": 0.4, "changed_frac_by_module": {"q_proj": 0.9},
               "principal_angle_top": 12.0, "alpha_by_module": {"q_proj": 3.0}}
    assert D.trajectory_values(summary) == {"rel_update_total": 0.3, "rel_update/q_proj": 0.2,
                                            "rel_update/embed": 0.1, "changed_frac": 0.4,
                                            "principal_angle_top": 12.0}
    assert D.trajectory_values({"rel_update_by_module": None}) == {}


@pytest.fixture
def toy_names():
    names = ["toy_stream", "toy_bad"]
    yield names
    for n in names:
        D.unregister(n)


def test_register_and_unregister(toy_names):
    before = dict(D.DIAGNOSTICS)
    d = Diagnostic("toy_stream", None, columns=("toy_col",), needs="stream",
                   aggregates=(Aggregate("toy_col", how="sum_sq", scopes=("total",), results=("total",),
                                         trajectory=("total",)),))
    assert D.register(d) is d
    assert D.DIAGNOSTICS["toy_stream"] is d and list(D.DIAGNOSTICS)[-1] == "toy_stream"
    assert D.stream_columns()[-1] == "toy_col"
    assert D.results_keys()[-1] == "toy_col"
    assert D.trajectory_values({"toy_col": 5.0}) == {"toy_col": 5.0}
    D.unregister("toy_stream")
    assert D.DIAGNOSTICS == before
    D.unregister("toy_stream")  # unknown names are ignored
    assert D.DIAGNOSTICS == before


@pytest.mark.parametrize("d, message", [
    (Diagnostic("update_norms", None, needs="stream"), "diagnostic 'update_norms' registered twice"),
    (Diagnostic("toy_bad", None, needs="stremm"),
     "diagnostic 'toy_bad': needs must be stream, values or vectors, not 'stremm'"),
    (Diagnostic("toy_bad", lambda m: {}, columns=("alpha_ft", "k", "new")),
     "diagnostic 'toy_bad': columns ['alpha_ft', 'k'] already exist"),
    (Diagnostic("toy_bad", None, aggregates=(Aggregate("toy_x", scopes=("total", "row")),)),
     "diagnostic 'toy_bad': unknown scope 'row' (known: total, module, layer, cell)"),
    (Diagnostic("toy_bad", None, aggregates=(Aggregate("rel_update", scopes=("module",)),)),
     "diagnostic 'toy_bad': summary key 'rel_update_by_module' already exists"),
    (Diagnostic("toy_bad", None, aggregates=(Aggregate("toy_x", scopes=("total",), results=("module",)),)),
     "diagnostic 'toy_bad': results/trajectory scopes must be among its scopes"),
    (Diagnostic("toy_bad", None, aggregates=(Aggregate("toy_x", scopes=("total",), trajectory=("module",)),)),
     "diagnostic 'toy_bad': results/trajectory scopes must be among its scopes"),
])
def test_register_refuses(toy_names, d, message):
    before = dict(D.DIAGNOSTICS)
    with pytest.raises(ValueError) as e:
        D.register(d)
    assert str(e.value) == message
    assert D.DIAGNOSTICS == before
