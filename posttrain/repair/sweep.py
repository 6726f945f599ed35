"""Recovery sweeps: a grid of repairs of one damaged model, each written, evaluated and scored.

Grid format (a YAML list; each entry is one method, list values are swept, several lists form a
Cartesian product)::

    - {method: uv_merge, mode: direction, top: [0.05, 0.1, 0.2, 0.5, 1.0]}
    - {method: uv_merge, mode: direction, top: 0.2, bottom: 0.05}
    - {method: reset_layers, first_frac: [0.25, 0.5]}
    - {name: wise, method: interpolate, alpha: [0.25, 0.5, 0.75]}

Any parameter of the method (and the selection keys layers, first_frac, last_frac, embeddings,
head, modules, include, exclude) may appear. For list-valued parameters (modules, include,
exclude, lambdas) a plain list is the value and a list of lists is swept. ``name`` (optional)
replaces the method in the repaired models' names; names are ``<name or method>_<key>-<value>_...``
over all given parameters (only the swept ones when ``name`` is given) and must be unique.

Scores, per repaired model R, with D the damaged model, B the base and REF the reference:

    ood_recovered_frac = (ood(R) − ood(D)) / (ood(REF) − ood(D))
    id_kept_frac       = (id(R) − id(B)) / (id(D) − id(B))

i.e. the share of the OOD gap to the reference that the repair closes, and the share of the
in-domain gain that fine-tuning bought over the base that the repair keeps (1 = all kept, 0 = back
to the base). `id_kept_frac` is None when its denominator is zero (nothing gained).

Noise rule of `ood_recovered_frac`: it is None unless the lost gap ood(REF) − ood(D) is positive and
larger than twice its binomial standard error sqrt(p_REF (1 − p_REF) / n + p_D (1 − p_D) / n) on the
fixed OOD problem set (n = `ood_n` in the scores; an evaluator that reports no `ood_n` gets the sign
check alone). A gap inside the noise, or an SFT that *raised* OOD accuracy, leaves nothing to
recover, and a fraction of it would be noise over noise (a one-problem gap gives exactly 0 or 1).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posttrain.errors import UserError
from posttrain.evaluation.noise import binomial_se, combine_se
from posttrain.io import atomic_write_json
from posttrain.repair.base import REPAIRS, SELECTION, Repair, get_repair, is_list_param
from posttrain.repair.writer import is_cached, model_info, open_inputs, read_record, record_key, write_repair

EvaluateFn = Callable[[Path], dict]
EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class SweepItem:
    """One repaired model of a grid: its name, method, parameters and where it sits on the curves."""

    name: str
    method: str
    params: dict[str, Any] = field(hash=False)
    axis: str
    x: float | None
    series: str


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(_fmt(x) for x in v)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(v))


def expand_grid(grid: list[dict[str, Any]]) -> list[SweepItem]:
    """The grid's entries expanded into single repairs; `UserError` for any invalid entry or parameter."""
    if not isinstance(grid, list):
        raise UserError("repair grid must be a list of {method: ..., <param>: value or [values]} entries, "
                        f"got {type(grid).__name__}")
    items: list[SweepItem] = []
    for i, entry in enumerate(grid):
        where = f"repair grid entry {i}"
        if not isinstance(entry, dict) or "method" not in entry:
            raise UserError(f"{where}: expected a mapping with a 'method' key, got {entry!r}")
        method, prefix = entry["method"], entry.get("name")
        if method not in REPAIRS:
            raise UserError(f"{where}: unknown repair method {method!r} (known: {', '.join(sorted(REPAIRS))})")
        if prefix is not None and (not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix)):
            raise UserError(f"{where}: name must be a plain identifier, got {prefix!r}")
        cls = REPAIRS[method]
        spec = {**cls.Params.model_fields, **SELECTION}
        params = {k: v for k, v in entry.items() if k not in ("method", "name")}
        unknown = sorted(set(params) - set(spec))
        if unknown:
            raise UserError(f"{where} ({method}): unknown parameter(s) {', '.join(unknown)} "
                            f"(known: {', '.join(spec)})")
        swept = [k for k, v in params.items() if isinstance(v, list) and
                 (not is_list_param(spec[k]) or (v and all(isinstance(x, list) for x in v)))]
        for k in swept:
            if not params[k]:
                raise UserError(f"{where} ({method}): {k} is an empty list")
        axis = cls.axis if cls.axis in swept or not swept else swept[0]
        for values in itertools.product(*(params[k] for k in swept)):
            p = {**params, **dict(zip(swept, values))}
            shown = [k for k in p if k in swept] if prefix else list(p)
            name = "_".join([prefix or method, *(f"{k}-{_fmt(p[k])}" for k in shown)])
            field = spec.get(axis)
            x = p.get(axis, None if field is None or field.is_required() else field.default)
            if isinstance(x, list):
                x = x[0] if len(x) == 1 else None
            fixed = [f"{k}={_fmt(v)}" for k, v in p.items() if k != axis]
            series = " ".join([prefix or method, *fixed])
            numeric = isinstance(x, (int, float)) and not isinstance(x, bool)
            items.append(SweepItem(name, method, p, axis, x if numeric else None, series))
            get_repair(method, **p)  # validates values and ranges now, before any work
    seen: set[str] = set()
    for it in items:
        if it.name in seen:
            raise UserError(f"repair grid: two entries both produce {it.name!r}; give them different 'name's")
        seen.add(it.name)
    return items


def validate_grid(grid: list[dict[str, Any]]) -> None:
    """Check a grid without touching any model (for config validation)."""
    expand_grid(grid)


def _scores(evaluate_fn: EvaluateFn, path: Path) -> dict:
    s = evaluate_fn(path)
    if not isinstance(s, dict) or not all(isinstance(s.get(k), (int, float)) for k in ("id_acc", "ood_acc")):
        raise TypeError(f"evaluate_fn({path}) must return a dict with numeric 'id_acc' and 'ood_acc', got {s!r}")
    return s


def _frac(num: float, den: float) -> float | None:
    return None if abs(den) < 1e-12 else num / den


def recovered_frac_se(repaired: float, damaged: float, reference: float, se_repaired: float | None,
                      se_damaged: float | None, se_reference: float | None) -> float | None:
    """Delta-method standard error of f = (R − D) / (REF − D), the recovered fraction, from the SEs of
    three accuracies treated as independent:

        SE(f) = sqrt(se_R² + f² se_REF² + (1 − f)² se_D²) / |REF − D|

    (∂f/∂R = 1/g, ∂f/∂REF = −f/g, ∂f/∂D = −(1 − f)/g with g = REF − D). The three models answer
    the same problems, so their errors are positively correlated and this overstates the noise, the
    conservative side for a claim. None when an SE is unknown or g = 0.
    """
    gap = reference - damaged
    if any(x is None for x in (se_repaired, se_damaged, se_reference)) or abs(gap) < 1e-12:
        return None
    f = (repaired - damaged) / gap
    return math.sqrt(se_repaired**2 + f * f * se_reference**2 + (1 - f) ** 2 * se_damaged**2) / abs(gap)


def recovery_scores(repaired: dict, damaged: dict, reference: dict, base: dict) -> dict[str, float | None]:
    """ood_recovered_frac (None unless the gap passes the noise rule of the module docstring) and its
    delta-method SE (`recovered_frac_se`), id_kept_frac, and their denominators, with the gap's SE.

    Each scores dict holds "id_acc", "ood_acc" and, for the noise rule, "ood_n" (the number of OOD
    problems; the damaged model's count stands in for a repaired model's that lacks it)."""
    n_d = damaged.get("ood_n")
    n_ref, n_rep = reference.get("ood_n", n_d), repaired.get("ood_n", n_d)
    r, d, ref = repaired["ood_acc"], damaged["ood_acc"], reference["ood_acc"]
    se_r, se_d, se_ref = binomial_se(r, n_rep), binomial_se(d, n_d), binomial_se(ref, n_ref)
    ood_gap = ref - d
    gap_se = combine_se(se_ref, se_d)
    beyond_noise = ood_gap > 1e-12 and (gap_se is None or ood_gap > 2 * gap_se)
    id_gain = damaged["id_acc"] - base["id_acc"]
    return {
        "ood_recovered_frac": (r - d) / ood_gap if beyond_noise else None,
        "ood_recovered_se": recovered_frac_se(r, d, ref, se_r, se_d, se_ref) if beyond_noise else None,
        "id_kept_frac": _frac(repaired["id_acc"] - base["id_acc"], id_gain),
        "ood_gap": ood_gap,
        "ood_gap_se": gap_se,
        "id_gain": id_gain,
    }


def _cached_eval(path: Path, eval_key: str | None) -> dict | None:
    if eval_key is None:
        return None
    try:
        js = json.loads((path / EVAL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return js.get("scores") if js.get("eval_key") == eval_key else None


def run_repair_sweep(base_dir: str | Path, damaged_dir: str | Path, reference_dir: str | Path, out_root: str | Path,
                     grid: list[dict[str, Any]], evaluate_fn: EvaluateFn, *, anchors: dict[str, dict] | None = None,
                     eval_key: str | None = None, device: str = "cpu",
                     log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Repair `damaged_dir` towards `base_dir` for every grid point, evaluate, and score recovery.

    Each repaired checkpoint is written to ``out_root/<name>/`` and reused when its repair.json
    matches (same method, params and input fingerprints). Its scores go to ``out_root/<name>/eval.json``
    and are reused when `eval_key` (e.g. a hash of the eval settings) is given and matches;
    without `eval_key` every repaired model is evaluated. `anchors` may supply already computed
    {"base", "damaged", "reference"} scores; missing ones are evaluated with `evaluate_fn`.

    Returns the ``repairs`` mapping of results.json: {name: {"method", "params", "axis", "x",
    "series", "path", "cached", "id_acc", "ood_acc", "ood_recovered_frac", "ood_recovered_se",
    "id_kept_frac", "ood_gap", "ood_gap_se", "id_gain", "n_tensors_repaired", "eval"}} in grid order.
    """
    say = log or (lambda _msg: None)
    items = expand_grid(grid)
    out_root = Path(out_root)
    _, (dmg_ck,) = open_inputs(base_dir, [damaged_dir])
    info = model_info(dmg_ck)
    repairs: dict[str, Repair] = {}
    for it in items:  # resolve every layer range against the model before writing anything
        r = get_repair(it.method, **it.params)
        r.check_targets(1)
        r.plan(info)
        repairs[it.name] = r
    if not Path(reference_dir).exists():
        raise UserError(f"reference checkpoint not found: {reference_dir}")

    known = dict(anchors or {})
    paths = {"base": Path(base_dir), "damaged": Path(damaged_dir), "reference": Path(reference_dir)}
    for role, path in paths.items():
        if role not in known:
            same = next((r for r, p in paths.items() if r in known and p.resolve() == path.resolve()), None)
            known[role] = known[same] if same else _scores(evaluate_fn, path)
    for role in paths:
        if not all(isinstance(known[role].get(k), (int, float)) for k in ("id_acc", "ood_acc")):
            raise TypeError(f"anchors[{role!r}] must have numeric 'id_acc' and 'ood_acc'")

    results: dict[str, dict] = {}
    for i, it in enumerate(items, 1):
        repair, path = repairs[it.name], out_root / it.name
        key = record_key(repair, base_dir, [damaged_dir])
        cached = is_cached(path, key)
        if cached:
            rec = read_record(path)
        else:
            rec = write_repair(repair, base_dir, [damaged_dir], path, overwrite=True, device=device,
                               show_progress=False)
        scores = _cached_eval(path, eval_key)
        if scores is None:
            scores = _scores(evaluate_fn, path)
            atomic_write_json(path / EVAL_FILE, {"eval_key": eval_key, "scores": scores})
        entry = {
            "method": it.method,
            "params": repair.params,
            "axis": it.axis,
            "x": it.x,
            "series": it.series,
            "path": str(path),
            "cached": cached,
            "id_acc": scores["id_acc"],
            "ood_acc": scores["ood_acc"],
            **recovery_scores(scores, known["damaged"], known["reference"], known["base"]),
            "n_tensors_repaired": rec["n_tensors"]["repaired"],
            "eval": scores,
        }
        results[it.name] = entry
        frac = entry["ood_recovered_frac"]
        say(f"repair {i}/{len(items)} {it.name}{' (cached)' if cached else ''}: ood {entry['ood_acc']:.3f} "
            f"id {entry['id_acc']:.3f} ood recovered {'n/a' if frac is None else f'{frac:.2f}'}")
    return results
