"""A sweep: a study config whose `sweep:` names axes over config paths; every combination of their
values (crossed with the config's `seeds`) is a study under `<out>/cells/<name>/`, and
`<out>/sweep.json` + `<out>/report.html` show each finding per cell and the headline metrics
against each axis.

An axis is a dotted path into the resolved study config (`model.hidden_size`,
`methods.grpo.kl_coef`, `pretrain.mixture.0.formats.eq`: integers index lists), or several paths
joined by "+" that all take the axis' value (`methods.sft.lr+methods.grpo.lr`). Every cell's config
is built and validated before anything runs. Cells whose base would be pretrained identically (same
model, pretraining, world and seed) pretrain it once: later cells start from a copy of the first
one's finished base, which the stage cache then accepts as its own (its key matches).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from posttrain.config import StudyConfig, deep_merge, dump_yaml, format_validation_error
from posttrain.errors import UserError
from posttrain.io import atomic_write_json, atomic_write_text, read_json, versions
from posttrain.multiseed import Log, claim_root, default_log, run_cell, run_seeds

# paths a sweep may not vary: the seeds are crossed with every cell by `seeds:` instead
RESERVED = ("seed", "seeds", "sweep", "name")
MAX_NAME = 120


@dataclass(frozen=True)
class Cell:
    name: str  # directory name under cells/, from the axis values
    values: dict[str, Any]  # axis -> value
    cfg: StudyConfig


def axis_paths(axis: str) -> list[str]:
    return [p.strip() for p in axis.split("+")]


def set_dotted(data: Any, path: str, value: Any) -> None:
    """Set the node at dotted `path` of nested dicts/lists `data` to `value`. Every step but the last
    must exist (a dict key, or an in-range integer index of a list); the last may add a dict key. A
    mapping set on a section merges into it (`model: {hidden_size: 64}` keeps the other model fields)."""
    parts = path.split(".")
    if not path or any(p == "" for p in parts):
        raise UserError(f"sweep axis {path!r} is not a dotted config path (e.g. model.hidden_size)")
    if parts[0] in RESERVED:
        raise UserError(f"sweep axis {path!r}: {parts[0]} cannot be swept"
                        + (" (list the seeds under `seeds:`; they are crossed with every cell)" if "seed" in parts[0] else ""))
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i]) or "the config"
        if isinstance(node, list):
            if not re.fullmatch(r"\d+", part) or int(part) >= len(node):
                raise UserError(f"sweep axis {path!r}: {where} is a list of {len(node)}; {part!r} is not an index of it")
            if last:
                node[int(part)] = _merged(node[int(part)], value)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = _merged(node.get(part), value)
            elif part in node and not isinstance(node[part], (dict, list)):
                raise UserError(f"sweep axis {path!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
            elif part not in node:
                known = ", ".join(k for k, v in node.items() if isinstance(v, (dict, list)))
                raise UserError(f"sweep axis {path!r}: {where} has no section {part!r}"
                                + (f" (has: {known})" if known else ""))
            else:
                node = node[part]
        else:  # a value reached through a list index
            raise UserError(f"sweep axis {path!r}: {where} is a value, not a section")


def _merged(old: Any, value: Any) -> Any:
    return deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value


def format_value(v: Any) -> str:
    """A value as it appears in a cell name: 64, 0.001, 5e-05, true, steps; a mapping as
    `eq-0.8_steps-0.2`, a list as `1_2`."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float, str)):
        return str(v)
    if isinstance(v, dict):
        return "_".join(f"{k}-{format_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "_".join(format_value(x) for x in v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def axis_labels(axes: list[str]) -> dict[str, str]:
    """Short, distinct labels of the axes: the last path segment, lengthened until they differ
    (`methods.sft.lr` and `methods.grpo.lr` -> `sft.lr`, `grpo.lr`)."""
    def label(axis: str, depth: int) -> str:
        return "+".join(dict.fromkeys(".".join(p.split(".")[-depth:]) for p in axis_paths(axis)))

    depth = {a: 1 for a in axes}
    for _ in range(max((len(p.split(".")) for a in axes for p in axis_paths(a)), default=1)):
        labels = {a: label(a, depth[a]) for a in axes}
        clash = [a for a in axes if list(labels.values()).count(labels[a]) > 1]
        if not clash:
            return labels
        for a in clash:
            depth[a] += 1
    return {a: label(a, depth[a]) for a in axes}


def cell_name(values: dict[str, Any], labels: dict[str, str]) -> str:
    """`hidden_size=64,kl_coef=0.001`: filesystem-safe (other characters become "_"), at most
    MAX_NAME characters (longer names are cut and end in a hash of the full one)."""
    raw = ",".join(f"{labels[a]}={format_value(v)}" for a, v in values.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", raw)
    if safe.startswith((".", "-")):
        safe = "_" + safe
    if len(safe) > MAX_NAME:
        safe = safe[:MAX_NAME - 9] + "-" + hashlib.sha256(raw.encode()).hexdigest()[:8]
    return safe


def plan_sweep(cfg: StudyConfig) -> list[Cell]:
    """Every cell of `cfg.sweep` (the product of the axes, first axis slowest), each config built from
    the resolved `cfg` with the cell's values set and validated; a problem raises a one-line UserError
    naming the axis."""
    if not cfg.sweep:
        raise UserError("this config has no `sweep:` axes")
    axes = list(cfg.sweep)
    for axis in axes:
        values = cfg.sweep[axis]
        seen = [json.dumps(v, sort_keys=True) for v in values]
        if dup := next((v for v, s in zip(values, seen) if seen.count(s) > 1), None):
            raise UserError(f"sweep axis {axis!r} lists the value {format_value(dup)} twice")
    base = cfg.model_dump(mode="json")
    base["sweep"] = None
    labels = axis_labels(axes)
    cells, names = [], set()
    for combo in itertools.product(*(cfg.sweep[a] for a in axes)):
        values = dict(zip(axes, combo))
        data = copy.deepcopy(base)
        for axis, v in values.items():
            for path in axis_paths(axis):
                set_dotted(data, path, v)
        name = cell_name(values, labels)
        try:
            cell_cfg = StudyConfig.model_validate(data)
        except ValidationError as e:
            raise UserError(f"sweep {_blame(e, values)} (cell {name}): "
                            + format_validation_error(e).removeprefix("invalid config: ")) from None
        k, unique = 2, name
        while unique in names:  # distinct values that read alike after sanitising
            unique, k = f"{name}-{k}", k + 1
        names.add(unique)
        cells.append(Cell(unique, values, cell_cfg))
    return cells


def _blame(err: ValidationError, values: dict[str, Any]) -> str:
    """The axis (and value) an invalid cell config is due to: the one whose path the error's location
    starts with, else every axis of the cell."""
    loc = ".".join(str(x) for x in err.errors()[0]["loc"])
    hit = [a for a in values if any(loc == p or loc.startswith(p + ".") or p.startswith(loc + ".")
                                    for p in axis_paths(a))]
    return ", ".join(f"axis {a!r} = {format_value(values[a])}" for a in (hit or values))


class SharedBases:
    """Finished base models by their pretraining key: a later run with the same key starts from a
    copy (base/, pretrain/ metrics and its stamp; the base evaluation too, which the stage cache
    re-checks by its own key), so identical pretraining runs once per sweep."""

    def __init__(self) -> None:
        self.donors: dict[str, Path] = {}

    def __call__(self, cfg: StudyConfig, run_dir: Path) -> None:
        from posttrain.study import pretrain_key

        if cfg.base_model is not None or (run_dir / ".stages" / "pretrain.json").exists():
            return
        donor = self.donors.get(pretrain_key(cfg))
        if donor is None:
            return
        shutil.copytree(donor / "base", run_dir / "base", dirs_exist_ok=True)
        (run_dir / "pretrain").mkdir(parents=True, exist_ok=True)
        for f in (donor / "pretrain").iterdir():
            if f.is_file():  # not checkpoints/: they serve only to resume an unfinished pretraining
                shutil.copy2(f, run_dir / "pretrain" / f.name)
        for rel in ("eval/base.json", ".stages/eval-base.json", ".stages/pretrain.json"):  # the stamp last
            if (donor / rel).is_file():
                (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(donor / rel, run_dir / rel)

    def record(self, cfg: StudyConfig, root: Path) -> None:
        """Offer the finished runs under `root` (one seed, or each seed-<n>/) as donors."""
        from posttrain.multiseed import seed_config
        from posttrain.study import pretrain_key

        runs = [(seed_config(cfg, s), root / f"seed-{s}") for s in cfg.seeds] if cfg.seeds else [(cfg, root)]
        for c, d in runs:
            stamp = d / ".stages" / "pretrain.json"
            key = pretrain_key(c)
            if c.base_model is None and stamp.is_file() and read_json(stamp).get("key") == key:
                self.donors.setdefault(key, d)


def run_sweep(cfg: StudyConfig, out: str | Path, resume: bool = False, device: str = "auto",
              log: Log | None = None) -> dict:
    """Run every cell of the sweep (validated up front) and write sweep.json and report.html."""
    from posttrain.report.html import write_report

    t0 = time.time()
    cells = plan_sweep(cfg)
    root = Path(out)
    claim_root(root, "sweep", resume)
    say = log or default_log()
    atomic_write_text(root / "config.yaml", dump_yaml(cfg))
    atomic_write_json(root / "versions.json", versions())
    shared = SharedBases()
    results = {}
    for i, cell in enumerate(cells):
        say(f"cell {i + 1} of {len(cells)}: {cell.name}")
        cell_dir = root / "cells" / cell.name
        results[cell.name] = run_cell(cell.cfg, cell_dir, device, lambda m, c=cell.name: say(f"[{c}] {m}"), shared)
        shared.record(cell.cfg, cell_dir)
    from posttrain.sweep_summary import summarize_sweep

    summary = summarize_sweep(cfg, [(c.name, c.values, results[c.name]) for c in cells],
                              wall_seconds=time.time() - t0)
    atomic_write_json(root / "sweep.json", summary)
    write_report(root)
    say(f"{len(cells)} cells done in {time.time() - t0:.0f}s: {root / 'sweep.json'} and {root / 'report.html'}")
    return summary


def run_config(cfg: StudyConfig, out: str | Path, resume: bool = False, device: str = "auto") -> dict:
    """What `posttrain study` / `posttrain demo` run: a sweep when the config has `sweep:`, several
    seeds when it has `seeds:`, else one study in `out` itself."""
    if cfg.sweep:
        return run_sweep(cfg, out, resume=resume, device=device)
    if cfg.seeds:
        return run_seeds(cfg, out, resume=resume, device=device)
    from posttrain.study import run_study

    root = Path(out)
    claim_root(root, "single", resume)
    return run_study(cfg, root, resume=resume, device=device)
