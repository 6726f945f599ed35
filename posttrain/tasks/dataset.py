"""A task whose problems are the rows of a dataset (`datasets.load_dataset`), declared in YAML.

The dataset is loaded on first use, not when the task is built, so validating a study config never
touches the hub. Every row the spec reads is checked when it is used; a problem with the data (a
missing column, an empty field, a reference answer that cannot be read) is a one-line `UserError`
naming the task file and the row.

Sampling: `sample(rng, split, "train")` draws a row of the split's train partition uniformly (with
replacement) from `rng`, so a prompt schedule is a function of the seed alone; `eval_set` is a
seed-dependent selection without replacement from the test partition (the whole partition when it
holds at most `n` rows).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any

from posttrain.errors import UserError
from posttrain.tasks.base import MALFORMED, Problem, Task, Verdict, held_out
from posttrain.tasks.spec import Source, TaskSpec, file_list, local_files, render, template_fields

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def last_match(pattern: str, text: str) -> str | None:
    """The answer a regex takes out of `text`: its last match's group `answer`, else group 1, else
    the whole match; None when it does not match."""
    m = None
    for m in re.finditer(pattern, text):
        pass
    if m is None:
        return None
    if "answer" in m.re.groupindex:
        return m.group("answer")
    return m.group(1) if m.re.groups else m.group(0)


def load_source(src: Source, where: str, name: str = "NAME", splits: tuple[str, ...] = ("train",)):
    """`datasets.load_dataset` of a source, as a DatasetDict; failures are one line naming the file
    (and, for a hub id, how to point the task `name` at local files for its dataset `splits`)."""
    import datasets

    from posttrain.progress import enabled_by_default

    path = src.path
    if src.data_files is not None:
        for f in local_files(src.data_files):
            if not os.path.isfile(f):
                raise UserError(f"{where}: source.data_files: file not found: {f}")
        if path is None:
            files = file_list(src.data_files)
            kinds = {_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
            if None in kinds or len(kinds) != 1:
                raise UserError(f"{where}: source.data_files: cannot tell the file type of {files} "
                                f"(use one of {', '.join(_BUILDERS)}, or set source.path to json, csv or parquet)")
            path = kinds.pop()
    if not enabled_by_default():
        datasets.disable_progress_bars()
    try:
        dd = datasets.load_dataset(path, name=src.name, data_files=src.data_files, revision=src.revision)
    except Exception as e:  # noqa: BLE001 - any failure of a third-party loader is reported as bad input
        first = (str(e).strip().splitlines() or [""])[0][:300]
        hint = ""
        if isinstance(e, (ConnectionError, OSError)) and src.data_files is None:
            files = ", ".join(f"{sp}: FILE.jsonl" for sp in splits)
            hint = (f"; to use local JSONL/parquet/CSV files instead: --set 'tasks.{name}.source={{data_files: "
                    f"{{{files}}}}}'")
        raise UserError(f"{where}: source: cannot load dataset {path!r}: {type(e).__name__}: {first}{hint}") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise UserError(f"{where}: source: expected a dataset with named splits, got {type(dd).__name__}")
    return dd


@dataclass
class _Pool:
    """Rows of one (split, partition): runs of indices into named dataset splits."""

    parts: list[tuple[str, list[int]]]

    def __len__(self) -> int:
        return sum(len(ix) for _, ix in self.parts)

    def __getitem__(self, k: int) -> tuple[str, int]:
        for name, ix in self.parts:
            if k < len(ix):
                return name, ix[k]
            k -= len(ix)
        raise IndexError(k)


class DatasetTask(Task):
    """A task defined by a `TaskSpec` (see posttrain/tasks/spec.py and configs/tasks/)."""

    def __init__(self, name: str, spec: TaskSpec) -> None:  # noqa: D107 - no registry parameters
        self.name = name
        self.spec = spec
        self.where = spec.origin or f"tasks.{name}"
        self.formats = spec.format_names
        self.splits = tuple(spec.splits)
        self._format_res = [(f.name, re.compile(f.regex)) for f in spec.formats]
        self._dd = None
        self._pools: dict[tuple[str, str], _Pool] = {}

    @property
    def solution_formats(self) -> tuple[str, ...]:
        return tuple(self.spec.solutions)

    # -- data -----------------------------------------------------------------------------------
    def _data(self):
        if self._dd is None:
            used = {n for s in self.spec.splits.values() for n in (s.train, s.test, s.data) if n is not None}
            dd = load_source(self.spec.source, self.where, self.name, tuple(sorted(used, reverse=True)))
            for split_name, s in self.spec.splits.items():
                for key in ("train", "test", "data"):
                    ds_name = getattr(s, key)
                    if ds_name is not None and ds_name not in dd:
                        raise UserError(f"{self.where}: splits.{split_name}.{key}: the dataset has no split {ds_name!r} "
                                        f"(has: {', '.join(dd)})")
            for ds_name in sorted(used):
                cols = dd[ds_name].column_names
                for field, key in self.spec.columns().items():
                    if field not in cols:
                        raise UserError(f"{self.where}: {key}: field {field!r} is not a column of dataset split "
                                        f"{ds_name!r} (columns: {', '.join(cols)})")
            self._dd = dd
        return self._dd

    def _columns(self, ds_name: str, names: set[str]) -> dict[str, list]:
        # one batch read per column: indexing a dataset row by row or column by column is ~10x slower
        ds = self._data()[ds_name]
        return ds.select_columns(sorted(names))[:] if names and len(ds) else {n: [] for n in names}

    def _rows_where(self, split: str, ds_name: str) -> list[int]:
        rules = self.spec.splits[split].where
        cols = self._columns(ds_name, {r.column for r in rules})
        keep = list(range(len(self._data()[ds_name])))
        for i, rule in enumerate(rules):
            column = cols[rule.column]
            try:
                keep = [k for k in keep if rule.holds(column[k])]
            except TypeError as e:
                raise UserError(f"{self.where}: splits.{split}.where[{i}]: cannot test field {rule.column!r} of "
                                f"dataset split {ds_name!r}: {e}") from None
        return keep

    def _pool(self, split: str, partition: str) -> _Pool:
        key = (split, partition)
        if key in self._pools:
            return self._pools[key]
        s = self.spec.splits[split]
        if s.data is None:
            parts = {"train": [(s.train, self._rows_where(split, s.train))],
                     "test": [(s.test, self._rows_where(split, s.test))]}
            parts["any"] = parts["train"] + parts["test"]
        else:
            rows = self._rows_where(split, s.data)
            if s.holdout > 0:
                # by prompt, so that duplicated prompts never sit on both sides
                cols = self._columns(s.data, set(template_fields(self.spec.prompt)))
                test = {k for k in rows if held_out(
                    "dataset", (self._fill(self.spec.prompt, {f: c[k] for f, c in cols.items()}, "prompt", s.data, k),),
                    s.holdout)}
                parts = {"train": [(s.data, [k for k in rows if k not in test])],
                         "test": [(s.data, [k for k in rows if k in test])], "any": [(s.data, rows)]}
            else:
                parts = {p: [(s.data, rows)] for p in ("train", "test", "any")}
        for p, pp in parts.items():
            pool = _Pool(pp)
            if not len(pool):
                names = ", ".join(n for n, _ in pp)
                raise UserError(f"{self.where}: splits.{split}: no rows for the {p} partition (dataset split {names}"
                                f"{', after where' if s.where else ''}{', after holdout' if s.holdout else ''})")
            self._pools[(split, p)] = pool
        return self._pools[key]

    def _row(self, ds_name: str, k: int) -> dict[str, Any]:
        return self._data()[ds_name][int(k)]

    def _fill(self, template: str, row: dict[str, Any], key: str, ds_name: str, k: int) -> str:
        try:
            return render(template, row)
        except KeyError as e:
            raise UserError(f"{self.where}: {key}: field {e.args[0]!r} is empty in row {k} of dataset split "
                            f"{ds_name!r}") from None

    def _problem(self, split: str, ds_name: str, k: int) -> Problem:
        row = self._row(ds_name, k)
        prompt = self._fill(self.spec.prompt, row, "prompt", ds_name, k)
        gold = None
        ans = self.spec.answer
        if ans is not None:
            value = row.get(ans.field)
            if value is None:
                raise UserError(f"{self.where}: answer.field: {ans.field!r} is empty in row {k} of dataset split {ds_name!r}")
            gold = str(value)
            if ans.extract is not None:
                gold = last_match(ans.extract, gold)
                if gold is None:
                    raise UserError(f"{self.where}: answer.extract: no match in field {ans.field!r} of row {k} of "
                                    f"dataset split {ds_name!r}: {str(value)[-80:]!r}")
                gold = gold.strip()
        return Problem(self.name, split, prompt, {"dataset_split": ds_name, "row_index": int(k), "row": row, "answer": gold})

    # -- the Task interface ---------------------------------------------------------------------
    def sample(self, rng: random.Random, split: str, partition: str = "any") -> Problem:
        self.check_split(split)
        pool = self._pool(split, partition)
        return self._problem(split, *pool[rng.randrange(len(pool))])

    def eval_set(self, split: str, n: int, seed: int) -> list[Problem]:
        """The fixed evaluation problems of a split: up to `n` distinct rows of its test partition."""
        self.check_split(split)
        pool = self._pool(split, "test")
        picks = random.Random(f"{seed}/eval/{self.name}/{split}").sample(range(len(pool)), min(n, len(pool)))
        return [self._problem(split, *pool[k]) for k in picks]

    def solve(self, problem: Problem, fmt: str, rng: random.Random | None = None) -> str:
        """The row's reference solution in format `fmt` (one per row: `rng` has nothing to choose)."""
        if not self.spec.solutions:
            raise UserError(f"task {self.name!r} has no reference solutions ({self.where}: set `solutions:`), "
                            "so it cannot be used for SFT on expert data")
        if fmt not in self.spec.solutions:
            raise UserError(f"task {self.name!r} has reference solutions in format(s) {', '.join(self.spec.solutions)}, "
                            f"not {fmt!r}")
        d = problem.data
        return self._fill(self.spec.solutions[fmt], d["row"], f"solutions.{fmt}", d["dataset_split"], d["row_index"])

    def classify(self, completion: str) -> str | None:
        """The format label of a completion: the first format whose regex matches, else the default."""
        for name, rx in self._format_res:
            if rx.search(completion):
                return name
        return self.spec.default_format

    def verify(self, problem: Problem, completion: str) -> Verdict:
        from posttrain.tasks.verifiers import GoldError

        fmt = self.classify(completion)
        if fmt is None:
            return MALFORMED
        got = completion
        extract = self.spec.completion.extract
        if extract is not None:
            got = last_match(extract, completion)
            if got is None:
                return MALFORMED
        d = problem.data
        try:
            ok = self.spec.verifier.check(got, d["answer"], d["row"], whole=extract is None)
        except GoldError as e:
            raise UserError(f"{self.where}: row {d['row_index']} of dataset split {d['dataset_split']!r}: {e} "
                            f"(verifier {self.spec.verifier.type})") from None
        if ok is None:
            return MALFORMED
        return Verdict(correct=ok, malformed=False, format=fmt)
