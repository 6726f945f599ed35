"""The repair registry, parameter validation and the tensor selection every repair shares.

A repair method is one class in one file::

    @register_repair("my_repair")
    class MyRepair(Repair):
        axis = "strength"                          # the parameter a sweep varies (x of the curves)

        class Params(Params):                      # typed parameters (pydantic); the CLI and the
            strength: Fraction = Field(description="How much to restore.")   # sweeps read them


        def eligible(self, t): ...                 # which selected tensors it can change
        def apply(self, name, base, targets): ...  # one output tensor from one base/target(s) tensor

The writer (`posttrain.repair.writer`) streams the checkpoint and calls `apply` once per tensor
that is both selected and eligible; every other tensor is copied bit for bit from the (first)
target. Parameters arrive from the CLI (whose `posttrain repair <name>` command is generated from
`Params` and `Selection`) or from YAML, so they are validated here by pydantic into one normalised,
JSON-safe dict (`Repair.params`) that `repair.json` records and the sweep cache compares.

Selection parameters, common to all repairs (a tensor is repaired when it passes all of them):

- ``layers`` ("0:6", "3", "0:2,5"; half-open Python ranges), or ``first_frac`` / ``last_frac``
  (the first / last ``max(1, floor(f * n_layers + 0.5))`` layers for f > 0): restrict to those
  decoder layers. With any layer restriction, tensors outside the layers (embeddings, final norm,
  head) are excluded unless ``embeddings`` (token and position embeddings) or ``head`` (lm_head
  and the final norm) adds them back. Without one, every tensor is in scope.
- ``modules``: module types as named by `posttrain.analysis.checkpoints.classify`
  (q_proj, k_proj, v_proj, qkv_proj, o_proj, gate_proj, up_proj, gate_up_proj, down_proj,
  embed, pos_embed, lm_head, norm, router, other).
- ``include`` / ``exclude``: shell-style glob patterns on tensor names.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from posttrain.analysis.checkpoints import MODULE_ORDER
from posttrain.errors import UserError

REPAIRS: dict[str, type["Repair"]] = {}


def register_repair(name: str):
    """Class decorator: make a `Repair` subclass available as `name` to the CLI, writer and sweeps."""

    def deco(cls: type[Repair]) -> type[Repair]:
        if name in REPAIRS and REPAIRS[name] is not cls:
            raise ValueError(f"repair {name!r} registered twice")
        cls.name = name
        REPAIRS[name] = cls
        return cls

    return deco


def get_repair(method: str, **params: Any) -> "Repair":
    """Build a registered repair from its name and (unvalidated) parameters."""
    if method not in REPAIRS:
        raise UserError(f"unknown repair method {method!r} (known: {', '.join(sorted(REPAIRS))})")
    return REPAIRS[method](**params)


def round_half_up(x: float) -> int:
    """floor(x + 0.5); the tiny epsilon absorbs float noise such as 0.35 * 10 = 3.4999999999999996."""
    return int(math.floor(x + 0.5 + 1e-9))


# ------------------------------------------------------------------------------------------------
# parameters: pydantic field types with the messages a user sees


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"must be a number, got {v!r}")
    return float(v)


def _fraction(v: Any) -> float:
    v = _number(v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"must be in [0, 1], got {v!r}")
    return v


def _strict_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _str_list(v: Any) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"must be a list of strings or a comma-separated string, got {v!r}")
    items = [y.strip() for x in items for y in x.split(",") if y.strip()]
    if not items:
        raise ValueError("is empty")
    return items


def _float_list(v: Any) -> list[float]:
    items = v if isinstance(v, (list, tuple)) else [v]
    if not items:
        raise ValueError("is empty")
    return [_number(x) for x in items]


def _layer_spec(v: Any) -> str:
    # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124, so integers are refused outright
    if not isinstance(v, str):
        raise ValueError(f"must be a string like '0:6', '3' or '0:2,5' (quote it in YAML), got {v!r}")
    spec = v.replace(" ", "")
    parse_layers(spec, None)  # syntax now; the range is checked against the model later
    return spec


Fraction = Annotated[float, BeforeValidator(_fraction)]
Number = Annotated[float, BeforeValidator(_number)]
Flag = Annotated[bool, BeforeValidator(_strict_bool)]
StrList = Annotated[list[str], BeforeValidator(_str_list)]
FloatList = Annotated[list[float], BeforeValidator(_float_list)]
LayerSpec = Annotated[str, BeforeValidator(_layer_spec)]


class Params(BaseModel):
    """Base of every repair's typed parameters (strict: unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class Selection(Params):
    """Which tensors a repair touches (shared by every repair; see the module docstring)."""

    layers: LayerSpec | None = Field(None, description="Only these decoder layers, e.g. 0:6, 3 or 0:2,5 (half-open ranges).")
    first_frac: Fraction | None = Field(None, description="Only the first fraction of the layers (e.g. 0.25).")
    last_frac: Fraction | None = Field(None, description="Only the last fraction of the layers.")
    embeddings: Flag = Field(False, description="With a layer restriction: also the token/position embeddings.")
    head: Flag = Field(False, description="With a layer restriction: also lm_head and the final norm.")
    modules: StrList | None = Field(None, description="Only these module types, comma-separated "
                                    "(q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,embed,lm_head,norm,...).")
    include: StrList | None = Field(None, description="Only tensors whose name matches this glob (repeatable).")
    exclude: StrList | None = Field(None, description="Skip tensors whose name matches this glob (repeatable).")


SELECTION = Selection.model_fields


def param_types(field) -> list:
    """The types a parameter's value can have: the alternatives of an optional (X | None), else its
    annotation (a list's own args are its items, not alternatives)."""
    ann = field.annotation
    return [a for a in get_args(ann) if a is not type(None)] if get_origin(ann) in (Union, UnionType) else [ann]


def is_list_param(field) -> bool:
    """Whether a parameter's value is itself a list (so a sweep over it is a list of lists)."""
    return any(get_origin(a) is list or (get_origin(a) is Annotated and get_origin(get_args(a)[0]) is list)
               for a in param_types(field))


def _message(method: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"{method}: {loc} is required"
    if first["type"] == "literal_error":  # pydantic's "Input should be ..." would not read as a sentence here
        return f"{method}: {loc} must be one of {first['ctx']['expected']}, got {first['input']!r}"
    return f"{method}: {loc} {msg}"


def parse_layers(spec: str, n_layers: int | None, what: str = "layers") -> list[int]:
    """'0:6' -> [0..5], '3' -> [3], '0:2,5' -> [0, 1, 5], '2:' -> [2..n-1]; half-open like Python.

    With `n_layers` given, an index at or beyond it is a `UserError` naming the model's size.
    """
    out: list[int] = []
    for part in spec.split(","):
        if not part:
            raise UserError(f"{what}: empty item in {spec!r}")
        try:
            if ":" in part:
                a, _, b = part.partition(":")
                lo = int(a) if a else 0
                if b:
                    hi = int(b)
                elif n_layers is not None:
                    hi = n_layers
                else:
                    hi = None
            else:
                lo = int(part)
                hi = lo + 1
        except ValueError:
            raise UserError(f"{what}: cannot parse {spec!r} (expected e.g. '0:6', '3' or '0:2,5')") from None
        if lo < 0 or (hi is not None and hi < 0):
            raise UserError(f"{what}: negative layer index in {spec!r}")
        if hi is not None and hi <= lo:
            raise UserError(f"{what}: empty range {part!r} in {spec!r}")
        if n_layers is not None:
            assert hi is not None
            if hi > n_layers:
                last = f"0-{n_layers - 1}" if n_layers else "none"
                raise UserError(f"{what}: {spec!r} is beyond the model, which has {n_layers} layers ({last})")
            out.extend(range(lo, hi))
    return sorted(set(out))


def layers_from_frac(frac: float, n_layers: int, last: bool) -> list[int]:
    """The first (or last) max(1, round_half_up(frac * n_layers)) layers; none for frac == 0."""
    n = 0 if frac == 0 else max(1, round_half_up(frac * n_layers))
    n = min(n, n_layers)
    return list(range(n_layers - n, n_layers)) if last else list(range(n))


# ------------------------------------------------------------------------------------------------
# the model as the writer sees it


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string of the target, e.g. "F32", "BF16"
    layer: int | None
    module: str

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


@dataclass
class ModelInfo:
    tensors: dict[str, TensorInfo]
    n_layers: int


_EMBED = ("embed", "pos_embed")
_HEAD = ("lm_head", "norm")


class Repair:
    """Base class: validated `params`, the selection, and the per-tensor hooks subclasses override."""

    name: ClassVar[str] = ""
    axis: ClassVar[str] = ""
    multi_target: ClassVar[bool] = False
    help: ClassVar[str] = ""  # one line for `posttrain repair --help` (default: the docstring's first paragraph)
    Params: ClassVar[type[Params]] = Params

    def __init__(self, **params: Any) -> None:
        own = {k: v for k, v in params.items() if k not in SELECTION and v is not None}
        sel = {k: v for k, v in params.items() if k in SELECTION and v is not None}
        unknown = sorted(set(own) - set(self.Params.model_fields))
        if unknown:
            known = [*self.Params.model_fields, *SELECTION]
            raise UserError(f"{self.name}: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(known)})")
        try:
            own_p, sel_p = self.Params.model_validate(own), Selection.model_validate(sel)
        except ValidationError as e:
            raise UserError(_message(self.name, e)) from None
        self.params: dict[str, Any] = {**own_p.model_dump(), **sel_p.model_dump()}
        given = [k for k in ("layers", "first_frac", "last_frac") if self.params[k] is not None]
        if len(given) > 1:
            raise UserError(f"{self.name}: give only one of layers, first_frac, last_frac (got {', '.join(given)})")
        bad = sorted(set(self.params["modules"] or []) - set(MODULE_ORDER))
        if bad:
            raise UserError(f"{self.name}: unknown module type(s) {', '.join(bad)} (known: {', '.join(MODULE_ORDER)})")
        self.check()
        self.resolved_layers: list[int] | None = None

    # -- hooks ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Cross-parameter validation (ranges are already checked); raise `UserError`."""

    def check_targets(self, n: int) -> None:
        """Validate the number of target checkpoints; `UserError` otherwise."""
        if n != 1 and not self.multi_target:
            raise UserError(f"{self.name} takes exactly one target, got {n}")
        if n < 1:
            raise UserError(f"{self.name} needs at least one target")

    def eligible(self, t: TensorInfo) -> bool:
        """Whether this repair changes a selected tensor; ineligible ones are copied from the target."""
        return True

    def apply(self, name: str, base: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """The output tensor; it must have the dtype and shape of targets[0]."""
        raise NotImplementedError

    # -- selection --------------------------------------------------------------------------------

    @property
    def restricted(self) -> bool:
        p = self.params
        return any(p[k] is not None for k in ("layers", "first_frac", "last_frac")) or p["embeddings"] or p["head"]

    def plan(self, model: ModelInfo) -> list[str]:
        """Names of the tensors this repair changes, in checkpoint order; `UserError` if none."""
        p = self.params
        layers: set[int] = set()
        if p["layers"] is not None:
            layers = set(parse_layers(p["layers"], model.n_layers, f"{self.name}: layers"))
        elif p["first_frac"] is not None or p["last_frac"] is not None:
            if model.n_layers == 0:
                raise UserError(f"{self.name}: layer fractions given but the model has no numbered layers")
            last = p["last_frac"] is not None
            layers = set(layers_from_frac(p["last_frac"] if last else p["first_frac"], model.n_layers, last))
        self.resolved_layers = sorted(layers) if self.restricted else None
        if p["head"] and not any(t.module == "lm_head" for t in model.tensors.values()):
            raise UserError(f"{self.name}: head requested but the checkpoint has no separate lm_head tensor "
                            "(tied to the embeddings? use embeddings instead)")
        chosen = [t.name for t in model.tensors.values() if self._selected(t, layers) and self.eligible(t)]
        if not chosen:
            raise UserError(f"{self.name}: the selection matches no tensor this repair can change "
                            f"({self.describe_selection()})")
        return chosen

    def in_scope(self, t: TensorInfo, layers: set[int]) -> bool:
        """Whether a tensor is inside the layer restriction (every tensor without one); a repair with
        its own notion of scope overrides this, the module/include/exclude filters apply after it."""
        p = self.params
        if not self.restricted:
            return True
        return (t.layer in layers) or (
            t.layer is None and ((p["embeddings"] and t.module in _EMBED) or (p["head"] and t.module in _HEAD)))

    def _selected(self, t: TensorInfo, layers: set[int]) -> bool:
        p = self.params
        if not self.in_scope(t, layers):
            return False
        if p["modules"] is not None and t.module not in p["modules"]:
            return False
        if p["include"] is not None and not any(fnmatch.fnmatchcase(t.name, g) for g in p["include"]):
            return False
        if p["exclude"] is not None and any(fnmatch.fnmatchcase(t.name, g) for g in p["exclude"]):
            return False
        return True

    def describe_selection(self) -> str:
        parts = [f"{k}={v}" for k, v in self.params.items() if k in SELECTION and v not in (None, False)]
        return ", ".join(parts) or "all tensors"

    def own_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if k in self.Params.model_fields}
