"""posttrain/repair/base.py: the registry, the exact one-line messages a user sees for bad repair
parameters and layer specs, and the selection's head/tied-embedding check (mutation survivors)."""

import pytest
from pydantic import Field

from posttrain.analysis.checkpoints import MODULE_ORDER
from posttrain.errors import UserError
from posttrain.repair.base import (REPAIRS, ModelInfo, Params, Repair, get_repair, is_list_param, param_types,
                                   parse_layers, register_repair)
from test_layer_selection import model_info


def refused(fn, *a, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*a, **kw)
    return str(e.value)


def model(n_layers: int, head: bool) -> ModelInfo:
    """test_layer_selection's model, with or without a separate lm_head tensor (a tied head has none)."""
    m = model_info(n_layers)
    if not head:
        del m.tensors["lm_head.weight"]
    return m


def test_parse_layers_messages_name_the_key_and_the_model():
    assert refused(parse_layers, "9", 4) == "layers: '9' is beyond the model, which has 4 layers (0-3)"
    assert refused(parse_layers, "0", 0) == "layers: '0' is beyond the model, which has 0 layers (none)"
    assert refused(parse_layers, "0:-2", 4) == "layers: negative layer index in '0:-2'"
    assert refused(parse_layers, "0:0", 4) == "layers: empty range '0:0' in '0:0'"
    assert refused(parse_layers, "1:2:3", 4, "x") == "x: cannot parse '1:2:3' (expected e.g. '0:6', '3' or '0:2,5')"
    # an open range without the model's size is syntax only: no layers yet, and no error
    assert parse_layers("2:", None) == [] and parse_layers(":3", None) == []
    assert parse_layers("2:", 4) == [2, 3]


def test_plan_messages_carry_the_repair_name():
    assert refused(get_repair("interpolate", alpha=0.5, layers="7").plan, model(4, True)) == (
        "interpolate: layers: '7' is beyond the model, which has 4 layers (0-3)")
    # a checkpoint whose head is tied to the embeddings has no lm_head tensor to select
    assert refused(get_repair("interpolate", alpha=0.5, layers="0", head=True).plan, model(4, False)) == (
        "interpolate: head requested but the checkpoint has no separate lm_head tensor "
        "(tied to the embeddings? use embeddings instead)")
    plan = get_repair("interpolate", alpha=0.5, layers="0", head=True).plan(model(4, True))
    assert plan == ["model.norm.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"]


def test_construction_messages_list_every_name():
    known = ", ".join(sorted(REPAIRS))
    assert refused(get_repair, "nope") == f"unknown repair method 'nope' (known: {known})"
    assert refused(get_repair, "interpolate", alpha=0.5, beta=1, gamma=2) == (
        "interpolate: unknown parameter(s) beta, gamma (known: alpha, layers, first_frac, last_frac, embeddings, "
        "head, modules, include, exclude)")
    assert refused(get_repair, "interpolate", alpha=0.5, layers="0", first_frac=0.5) == (
        "interpolate: give only one of layers, first_frac, last_frac (got layers, first_frac)")
    assert refused(get_repair, "interpolate", alpha=0.5, modules="mlp,attn") == (
        f"interpolate: unknown module type(s) attn, mlp (known: {', '.join(MODULE_ORDER)})")
    r = get_repair("interpolate", alpha=0.5)
    assert r.resolved_layers is None  # until plan() resolves them against a model
    assert refused(get_repair("task_arithmetic", lambdas=[1.0]).check_targets, 0) == (
        "task_arithmetic needs at least one target")


def test_registry_names_classes_and_refuses_a_second_class_under_one_name():
    try:
        @register_repair("_test_twice")
        class A(Repair):
            class Params(Params):
                xs: list[int] = Field(description="a plain list")

        assert REPAIRS["_test_twice"] is A and A.name == "_test_twice"
        assert register_repair("_test_twice")(A) is A  # the same class again (a re-import) is fine

        class B(Repair):
            pass

        with pytest.raises(ValueError, match=r"^repair '_test_twice' registered twice$"):
            register_repair("_test_twice")(B)
        assert REPAIRS["_test_twice"] is A
        # a plain list[int] field is a list parameter, and its item errors name the item's position
        assert is_list_param(A.Params.model_fields["xs"])
        assert param_types(A.Params.model_fields["xs"]) == [list[int]]  # its item type is no alternative
        assert param_types(REPAIRS["interpolate"](alpha=0.5).Params.model_fields["alpha"]) == [float]
        assert refused(A, xs=[1, "a"]).startswith("_test_twice: xs.1 ")
    finally:
        REPAIRS.pop("_test_twice", None)
