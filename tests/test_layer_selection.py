"""Layer fractions and the repair selection: round half up (not down, not to even), at least one
layer for a positive fraction, first vs last, and which tensors a repair then touches."""

import pytest
import torch

from posttrain.errors import UserError
from posttrain.repair.base import ModelInfo, TensorInfo, get_repair, layers_from_frac, parse_layers, round_half_up
from posttrain.repair.uv_merge import base_mask, spectrum_counts


@pytest.mark.parametrize("x,n", [(0.0, 0), (0.49, 0), (0.5, 1), (1.5, 2), (2.5, 3), (3.5, 4), (2.4999, 2),
                                 (0.35 * 10, 4), (0.15 * 10, 2), (0.45 * 10, 5), (7.0, 7), (6.6, 7)])
def test_round_half_up(x, n):
    assert round_half_up(x) == n
    assert isinstance(round_half_up(x), int)


@pytest.mark.parametrize("frac,n_layers,first", [
    (0.25, 6, [0, 1]),           # 1.5 -> 2 (half up)
    (0.35, 10, [0, 1, 2, 3]),    # 3.4999999999999996 -> 4
    (0.25, 4, [0]),
    (0.25, 10, [0, 1, 2]),       # 2.5 -> 3
    (0.24, 10, [0, 1]),          # 2.4 -> 2
    (0.5, 5, [0, 1, 2]),         # 2.5 -> 3
    (0.01, 6, [0]),              # a positive fraction resets at least one layer
    (0.0, 6, []),
    (1.0, 6, [0, 1, 2, 3, 4, 5]),
    (0.99, 3, [0, 1, 2]),
])
def test_layers_from_frac_first_and_last(frac, n_layers, first):
    assert layers_from_frac(frac, n_layers, last=False) == first
    assert layers_from_frac(frac, n_layers, last=True) == [n_layers - len(first) + i for i in range(len(first))]


def test_spectrum_counts_and_mask_round_half_up():
    assert spectrum_counts(10, 0.25, 0.15) == (3, 2)   # 2.5 -> 3, 1.5 -> 2
    assert spectrum_counts(6, 0.25, 0.0) == (2, 0)     # 1.5 -> 2
    assert spectrum_counts(10, 0.24, 0.04) == (2, 0)   # 2.4 -> 2, 0.4 -> 0 (no minimum of one here)
    assert base_mask(10, 0.2, 0.1).tolist() == [True, True] + [False] * 7 + [True]
    assert base_mask(6, 0.0, 0.25).tolist() == [False] * 4 + [True] * 2
    assert not base_mask(6, 0.0, 0.0).any()


def model_info(n_layers=6):
    tensors = {"model.embed_tokens.weight": TensorInfo("model.embed_tokens.weight", (10, 4), "F32", None, "embed"),
               "model.norm.weight": TensorInfo("model.norm.weight", (4,), "F32", None, "norm"),
               "lm_head.weight": TensorInfo("lm_head.weight", (10, 4), "F32", None, "lm_head")}
    for i in range(n_layers):
        for m in ("q_proj", "down_proj"):
            name = f"model.layers.{i}.{'self_attn' if m == 'q_proj' else 'mlp'}.{m}.weight"
            tensors[name] = TensorInfo(name, (4, 4), "F32", i, m)
        name = f"model.layers.{i}.input_layernorm.weight"
        tensors[name] = TensorInfo(name, (4,), "F32", i, "norm")
    return ModelInfo(tensors, n_layers)


def layers_of(names):
    return sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})


def test_reset_first_quarter_of_six_layers_resets_two():
    r = get_repair("reset_layers", first_frac=0.25, scope="layers")
    chosen = r.plan(model_info(6))
    assert r.resolved_layers == [0, 1] and layers_of(chosen) == [0, 1]
    assert len(chosen) == 6 and "model.embed_tokens.weight" not in chosen and "lm_head.weight" not in chosen
    r = get_repair("reset_layers", last_frac=0.35, scope="layers")
    assert layers_of(r.plan(model_info(10))) == [6, 7, 8, 9]
    # embeddings / head add those tensors back to a layer restriction
    r = get_repair("reset_layers", first_frac=0.25, embeddings=True, head=True, scope="layers")
    chosen = r.plan(model_info(6))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(chosen)
    r = get_repair("reset_layers", head=True, scope="layers")
    assert set(r.plan(model_info(2))) == {"model.norm.weight", "lm_head.weight"} and r.resolved_layers == []
    # the default, the reference's scope: the layers' matrices + token embeddings + LM head, no norms
    r = get_repair("reset_layers", first_frac=0.25)
    chosen = r.plan(model_info(6))
    assert r.resolved_layers == [0, 1] and layers_of(chosen) == [0, 1]
    assert set(chosen) == {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}


def test_selection_by_module_and_glob():
    r = get_repair("uv_merge", top=0.2, layers="1:3", modules=["down_proj"])
    assert r.plan(model_info(4)) == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    # uv_merge only takes 2-D float matrices: norms are not eligible
    r = get_repair("uv_merge", top=0.2)
    chosen = r.plan(model_info(2))
    assert "model.norm.weight" not in chosen and "model.embed_tokens.weight" in chosen and r.resolved_layers is None
    r = get_repair("uv_merge", top=0.2, include="*.q_proj.*", exclude=["*.layers.0.*"])
    assert r.plan(model_info(3)) == ["model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"]
    with pytest.raises(UserError, match="matches no tensor"):
        get_repair("uv_merge", top=0.2, modules="norm").plan(model_info(2))
    with pytest.raises(UserError, match="only one of"):
        get_repair("reset_layers", first_frac=0.25, last_frac=0.25)
    with pytest.raises(UserError, match="say what to reset"):
        get_repair("reset_layers", scope="layers")
    with pytest.raises(UserError, match="say which layers to reset"):
        get_repair("reset_layers")
    with pytest.raises(UserError, match="no numbered layers"):
        get_repair("reset_layers", first_frac=0.5).plan(ModelInfo({"w": TensorInfo("w", (2, 2), "F32", None, "other")}, 0))
    with pytest.raises(UserError, match="beyond the model"):
        get_repair("reset_layers", layers="0:7").plan(model_info(6))


def test_parse_layers_open_ranges_and_errors():
    assert parse_layers(":2", 5) == [0, 1]
    assert parse_layers("3:", 5) == [3, 4]
    assert parse_layers("4,0:2,1", 5) == [0, 1, 4]
    assert parse_layers("0:6", None) == []  # syntax only, without the model's size
    for bad, match in (("", "empty item"), ("1,,2", "empty item"), ("-1", "negative"), ("2:2", "empty range"),
                       ("x", "cannot parse"), ("5", "beyond")):
        with pytest.raises(UserError, match=match):
            parse_layers(bad, 5)


def test_reset_layers_apply_copies_the_base_in_the_target_dtype():
    r = get_repair("reset_layers", layers="0")
    base = torch.tensor([1.5, 2.25], dtype=torch.float32)
    out = r.apply("w", base, [torch.zeros(2, dtype=torch.bfloat16)])
    assert out.dtype == torch.bfloat16 and out.tolist() == [1.5, 2.25]
    assert out.data_ptr() != base.data_ptr()
    same = r.apply("w", base, [torch.zeros(2)])
    assert torch.equal(same, base) and same.data_ptr() != base.data_ptr()


def _coerce(kind, value, required=False):
    """Value of a parameter `k` of field type `kind` in a toy repair "m", as the repair stores it
    (validation errors surface as the repair's one-line `UserError`)."""
    from typing import Optional

    from pydantic import create_model

    from posttrain.repair.base import Params, Repair

    field = (kind, ...) if required else (Optional[kind], None)
    toy = type("M", (Repair,), {"name": "m", "Params": create_model("MParams", __base__=Params, k=field)})
    return toy(k=value).params["k"]


def test_param_coercion_per_kind():
    from typing import Literal

    from posttrain.repair.base import Flag, FloatList, Fraction, LayerSpec, Number, StrList

    assert _coerce(Fraction, 1) == 1.0 and isinstance(_coerce(Fraction, 1), float)
    assert _coerce(Fraction, 0) == 0.0 and _coerce(Number, -3) == -3.0 and isinstance(_coerce(Number, -3), float)
    assert _coerce(Fraction, None) is None
    for bad, match in ((1.5, r"^m: k must be in \[0, 1\], got 1\.5$"), (-0.1, r"^m: k must be in \[0, 1\], got -0\.1$"),
                       (True, r"^m: k must be a number, got True$"), ("0.2", r"^m: k must be a number, got '0\.2'$"),
                       (float("nan"), "^m: k must be a number, got nan$"), (float("inf"), "^m: k must be a number, got inf$")):
        with pytest.raises(UserError, match=match):
            _coerce(Fraction, bad)
    with pytest.raises(UserError, match=r"^m: k is required$"):
        _coerce(Fraction, None, required=True)
    assert _coerce(Number, 7.5) == 7.5
    with pytest.raises(UserError, match=r"^m: k must be a number, got True$"):
        _coerce(Number, True)
    assert _coerce(Flag, False) is False and _coerce(Flag, True) is True
    with pytest.raises(UserError, match=r"^m: k must be true or false, got 1$"):
        _coerce(Flag, 1)
    assert _coerce(Literal["a", "b"], "b") == "b"
    with pytest.raises(UserError, match=r"^m: k must be one of 'a' or 'b', got 'c'$"):
        _coerce(Literal["a", "b"], "c")
    assert _coerce(StrList, " x, y ,") == ["x", "y"]
    assert _coerce(StrList, ["x", " y", "z,w"]) == ["x", "y", "z", "w"]
    with pytest.raises(UserError, match=r"^m: k is empty$"):
        _coerce(StrList, " , ")
    with pytest.raises(UserError, match=r"^m: k must be a list of strings or a comma-separated string, got \[1, 2\]$"):
        _coerce(StrList, [1, 2])
    with pytest.raises(UserError, match="list of strings"):
        _coerce(StrList, 3)
    assert _coerce(FloatList, 0.5) == [0.5]
    assert _coerce(FloatList, [0, 1]) == [0.0, 1.0] and all(isinstance(x, float) for x in _coerce(FloatList, [0, 1]))
    with pytest.raises(UserError, match=r"^m: k is empty$"):
        _coerce(FloatList, [])
    with pytest.raises(UserError, match=r"^m: k must be a number, got 'x'$"):
        _coerce(FloatList, [0.5, "x"])
    assert _coerce(LayerSpec, " 0:2, 5 ") == "0:2,5"
    with pytest.raises(UserError, match=r"^m: k must be a string like '0:6', '3' or '0:2,5' \(quote it in YAML\), got 124$"):
        _coerce(LayerSpec, 124)
    with pytest.raises(UserError, match=r"layers: cannot parse 'a:b'"):
        _coerce(LayerSpec, "a:b")
    # a choice of a real repair reads the same way
    with pytest.raises(UserError, match=r"^uv_merge: mode must be one of 'full', 'direction' or 'magnitude', got 'x'$"):
        get_repair("uv_merge", top=0.2, mode="x")


def test_repair_construction_errors_and_params():
    r = get_repair("uv_merge", top=0.2, mode="direction")
    assert r.own_params() == {"top": 0.2, "bottom": 0.0, "mode": "direction", "svd_dtype": "auto",
                              "orthonormalize": False}
    assert r.params["embeddings"] is False and r.params["layers"] is None
    assert r.describe_selection() == "all tensors"
    assert get_repair("reset_layers", first_frac=0.25, head=True, scope="layers").describe_selection() == \
        "first_frac=0.25, head=True"
    with pytest.raises(UserError, match=r"^unknown repair method 'nope' \(known: "):
        get_repair("nope")
    with pytest.raises(UserError, match=r"^uv_merge: unknown parameter\(s\) topp \(known: top, bottom, mode"):
        get_repair("uv_merge", topp=0.2)
    with pytest.raises(UserError, match=r"^uv_merge: top is required$"):
        get_repair("uv_merge")
    with pytest.raises(UserError, match=r"^uv_merge: unknown module type\(s\) mlp \(known: "):
        get_repair("uv_merge", top=0.2, modules="mlp")
    with pytest.raises(UserError, match="takes exactly one target, got 2"):
        r.check_targets(2)
    r.check_targets(1)
    assert get_repair("reset_layers", layers="0").restricted and not r.restricted


def test_reset_layers_refusals_say_exactly_what_is_missing():
    import re

    def refused(**kw) -> str:
        with pytest.raises(UserError) as e:
            get_repair("reset_layers", **kw).check()
        return str(e.value)

    assert refused(first_frac=0.25, embeddings=True, head=True) == (
        "reset_layers: embeddings and head apply to scope 'layers'; scope 'reference' always resets the token "
        "embeddings and the LM head and never the norms")
    assert refused(first_frac=0.25, head=True).startswith("reset_layers: head apply to scope 'layers'")
    assert refused() == "reset_layers: say which layers to reset: layers (e.g. 0:6), first_frac or last_frac"
    assert refused(scope="layers") == ("reset_layers: say what to reset: layers (e.g. 0:6), first_frac, last_frac, "
                                       "embeddings or head")
    for ok in ({"first_frac": 0.25}, {"layers": "0:1"}, {"last_frac": 0.5}, {"scope": "layers", "head": True}):
        get_repair("reset_layers", **ok).check()
    assert re.search("scope", refused(first_frac=0.25, embeddings=True))
