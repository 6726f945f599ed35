"""Retention benchmarks through lm-evaluation-harness, scored in process on the model being studied.

A study's `retention:` list may name lm-eval tasks next to the built-in probes
(`{lm_eval: mmlu, limit: 500}`, `{lm_eval: mytask, include_path: tasks/}`). The in-memory model and
tokenizer are wrapped in lm-eval's `HFLM` (no reload, no second copy) and scored by lm-eval's
evaluator with a fixed seed, no request or response cache, no sample logging and no tracker
(nothing goes to the hub). One score per entry becomes its retention accuracy: the
metric named by `metric:`, else the first metric the task reports (its `metric_list` order, e.g.
`acc` for multiple-choice tasks, `exact_match` for GSM8K). Scores must be higher-is-better, since
forgetting is a drop.

Tasks found under an `include_path` are local tasks: they are indexed without lm-eval's ~15k
built-in task files (fast) and loaded with the hub switched off, so their data must be local files
(`dataset_path: json` with `dataset_kwargs.data_files`, or a local directory).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from posttrain.errors import UserError

if TYPE_CHECKING:
    from posttrain.config import LmEvalRef


@functools.lru_cache(maxsize=None)
def _manager(include_path: str | None, defaults: bool):
    # indexing lm-eval's built-in tasks parses ~15k YAML files (about 10-15 s), so one index per
    # process; a local-only index of a small directory takes milliseconds
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=include_path, include_defaults=defaults)


def resolve_task(name: str, include_path: str | None = None) -> tuple[Any, bool]:
    """The TaskManager that knows lm-eval task (or group, or tag) `name`, and whether it is a local
    task (found under `include_path` alone). A `UserError` with close matches when nobody knows it."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise UserError(f"lm_eval include_path {include_path!r} is not a directory")
        local = _manager(str(include_path), False)
        if name in local.all_tasks:
            return local, True
    tm = _manager(None if include_path is None else str(include_path), True)
    if name not in tm.all_tasks:
        close = difflib.get_close_matches(name, tm.all_tasks, n=3)
        where = f" (nor under include_path {include_path!r})" if include_path else ""
        hint = f"; close: {', '.join(close)}" if close else ""
        raise UserError(f"unknown lm_eval task {name!r}: not among lm-eval's tasks{where}{hint}")
    return tm, False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs a warning per run for an in-memory model and per duplicate YAML; keep the
    study's log readable."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch the hub off for `datasets` and `huggingface_hub` while a local task loads.

    Both libraries read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once at import, so setting the
    environment is not enough in a process that imported them already: their module flags are
    set too, and everything is restored afterwards."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    flags = [(dcfg, "HF_HUB_OFFLINE"), (dcfg, "HF_DATASETS_OFFLINE"), (hcfg, "HF_HUB_OFFLINE")]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in flags if hasattr(mod, attr)]
    os.environ.update({k: "1" for k in env})
    for mod, attr, _ in saved:
        setattr(mod, attr, True)
    try:
        yield
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for mod, attr, v in saved:
            setattr(mod, attr, v)


@contextlib.contextmanager
def _keep_rng() -> Iterator[None]:
    """Evaluation seeds the global random, numpy and torch generators; the caller's streams
    continue afterwards as if it had not run."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def pick_metric(row: dict[str, Any], metric: str | None, task: str) -> tuple[str, float]:
    """The retention score in one lm-eval result row ({"acc,none": 0.5, "acc_stderr,none": ...}).

    `metric` may name a metric ("acc_norm", preferring the unfiltered "none" variant, else the
    first filter) or a metric with its filter ("exact_match,flexible-extract"); None takes the
    first metric in the row (lm-eval writes them in the task's metric_list order)."""
    keys = [k for k in row if "," in k and not k.split(",", 1)[0].endswith("_stderr")]
    if not keys:
        raise UserError(f"lm_eval task {task!r} reports no score (a group without an aggregate metric? "
                        "name one of its tasks instead)")
    if metric is None:
        key = keys[0]
    elif "," in metric:
        key = metric if metric in keys else None
    else:
        named = [k for k in keys if k.split(",", 1)[0] == metric]
        key = f"{metric},none" if f"{metric},none" in named else (named[0] if named else None)
    if key is None:
        raise UserError(f"lm_eval task {task!r} reports no metric {metric!r} (it reports: {', '.join(keys)})")
    value = row[key]
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"lm_eval task {task!r}: metric {key!r} is {value!r}, not a finite number")
    return key, float(value)


def _prepare(loaded: dict, num_fewshot: int | None, seed: int) -> None:
    """What `simple_evaluate` does to freshly loaded tasks before `evaluate`: the entry's
    num_fewshot overrides each task's default unless the task pins 0, no default means 0-shot,
    and few-shot examples are drawn with the run's seed."""
    for task in loaded["tasks"].values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)


def evaluate_lm_eval(model, tok, ref: "LmEvalRef", seed: int, lm=None) -> dict[str, Any]:
    """Score `model` on one lm-eval task; returns {"acc": score, "metric", "n", "lm_eval", "metrics"}.

    `acc` holds the chosen score so retention code reads every probe the same way; `metrics` keeps
    every number lm-eval reported for the entry's own row. Runs lm-eval's `evaluator.evaluate` on
    tasks prepared as `simple_evaluate` prepares them; `simple_evaluate` itself would add ~2 s of
    environment probing (`pip list`, git) per call that the study does not keep."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    tm, local = resolve_task(ref.lm_eval, ref.include_path)
    offline = _hub_offline() if local else contextlib.nullcontext()
    with _quiet(), offline, _keep_rng():
        if lm is None:
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=ref.batch_size)
        try:
            loaded = tm.load([ref.lm_eval])
        except Exception as e:  # noqa: BLE001 - any failure to build a task or read its data is the task's
            where = f" (local task under {ref.include_path}, hub off)" if local else ""
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"lm_eval task {ref.lm_eval!r}{where}: cannot load it: {msg}") from None
        _prepare(loaded, ref.num_fewshot, seed)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        res = evaluate(lm=lm, task_dict=loaded, limit=ref.limit, cache_requests=False, bootstrap_iters=0,
                       write_out=False, log_samples=False)
    row = res["results"].get(ref.lm_eval)
    if row is None:  # a tag: several tasks and no aggregate of them
        raise UserError(f"lm_eval name {ref.lm_eval!r} is a tag of {len(res['results'])} tasks with no "
                        "aggregate score; name one task or a group")
    key, value = pick_metric(row, ref.metric, ref.lm_eval)
    metric = key.split(",", 1)[0]
    if res.get("higher_is_better", {}).get(ref.lm_eval, {}).get(metric) is False:
        raise UserError(f"lm_eval task {ref.lm_eval!r}: metric {metric!r} is lower-is-better; retention needs "
                        "a score that drops when the model forgets (set metric:)")
    n = sum(int(c.get("effective", 0)) for c in res.get("n-samples", {}).values())
    metrics = {k: v for k, v in row.items() if "," in k and isinstance(v, (int, float)) and math.isfinite(v)}
    return {"acc": value, "metric": key, "n": n, "lm_eval": ref.model_dump(mode="json"), "metrics": metrics}


def evaluate_lm_eval_refs(model, tok, refs: list["LmEvalRef"], seed: int) -> dict[str, dict[str, Any]]:
    """Scores of every lm-eval retention entry, keyed by `ref.key` (nothing imported when empty)."""
    if not refs:
        return {}
    from lm_eval.models.huggingface import HFLM

    out = {}
    for batch_size in sorted({r.batch_size for r in refs}):
        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        for ref in (r for r in refs if r.batch_size == batch_size):
            out[ref.key] = evaluate_lm_eval(model, tok, ref, seed, lm=lm)
    return {r.key: out[r.key] for r in refs}


def local_tasks_digest(refs: list["LmEvalRef"]) -> dict[str, str]:
    """Content hash of each include_path's YAML files: an edited local task invalidates cached scores."""
    import hashlib

    out = {}
    for path in sorted({r.include_path for r in refs if r.include_path}):
        h = hashlib.sha256()
        for f in sorted(Path(path).rglob("*.yaml")):
            h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes() + b"\0")
        out[path] = h.hexdigest()[:16]
    return out
