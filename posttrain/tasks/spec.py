"""The YAML schema of a dataset task, its validation and the study config's `tasks:` entries.

A dataset task is declared, not programmed: where the rows come from (`source`), which rows make
each split and its train/test partitions (`splits`, with declarative `where` rules), how a row
becomes a prompt (`prompt`, a `{field}` template), where its reference answer is (`answer`), how
an answer is read from a completion (`completion.extract`), how it is checked (`verifier`), which
solution format a completion is written in (`formats`, ordered regexes) and, optionally, the
reference solutions an expert demonstration is made of (`solutions`). No value is ever evaluated
as code. See configs/tasks/*.yaml for commented examples.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
import hashlib
import operator
import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import UserError
from posttrain.tasks.verifiers import Verifier

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- templates ------------------------------------------------------------------------------------

_TEMPLATE_PART = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


def template_fields(template: str) -> list[str]:
    """The `{field}` names of a template; `{{` and `}}` are literal braces. Anything else in braces
    (attribute access, indexing, format specs) is refused: templates only substitute row fields."""
    names = []
    for m in _TEMPLATE_PART.finditer(template):
        tok = m.group(0)
        if tok in ("{{", "}}"):
            continue
        if m.group(1) is None:
            raise ValueError(f"stray {tok!r} at character {m.start()} (write {{field}} for a row field, "
                             "{{ and }} for literal braces)")
        names.append(m.group(1))
    return names


def render(template: str, row: dict[str, Any]) -> str:
    """Fill a template checked by `template_fields` from a row; a missing or empty field is a KeyError."""

    def sub(m: re.Match) -> str:
        tok = m.group(0)
        if tok in ("{{", "}}"):
            return tok[0]
        value = row.get(m.group(1))
        if value is None:
            raise KeyError(m.group(1))
        return str(value)

    return _TEMPLATE_PART.sub(sub, template)


def _compiles(v: str) -> str:
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    return v


RegexStr = Annotated[str, AfterValidator(_compiles)]


# -- schema ---------------------------------------------------------------------------------------

class Source(Strict):
    """Arguments of `datasets.load_dataset`: a hub id or local dataset directory (`path`), or local
    files (`data_files`: one file, a list, or {dataset split name: file(s)}; the builder is inferred
    from the extension: .jsonl/.json, .csv, .parquet). Relative paths are relative to the current
    directory."""

    path: str | None = None
    name: str | None = None  # the dataset's configuration, e.g. "main" for openai/gsm8k
    revision: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None

    @model_validator(mode="after")
    def _needs_data(self) -> "Source":
        if self.path is None and self.data_files is None:
            raise ValueError("set source.path (a hub id or dataset directory) or source.data_files (local files)")
        return self


_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class Rule(BaseModel):
    """One row condition of `where`: a field (`field: level`) or the length of a list or string field
    (`len: nums`) tested by exactly one of `in: [..]`, `not_in: [..]`, `op: "<=" + value: 2`,
    `regex: PATTERN` (searched in the field's text)."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    field: str | None = None
    len: str | None = None
    in_: list[Any] | None = Field(None, alias="in")
    not_in: list[Any] | None = None
    op: Literal["==", "!=", "<", "<=", ">", ">="] | None = None
    value: Any = None
    regex: RegexStr | None = None

    @model_validator(mode="after")
    def _one_of_each(self) -> "Rule":
        if (self.field is None) == (self.len is None):
            raise ValueError("a where rule names exactly one of `field` and `len`")
        tests = [k for k, v in (("in", self.in_), ("not_in", self.not_in), ("op", self.op), ("regex", self.regex))
                 if v is not None]
        if len(tests) != 1:
            raise ValueError("a where rule has exactly one test: `in`, `not_in`, `op` (with `value`) or `regex`")
        if self.op is not None and "value" not in self.model_fields_set:
            raise ValueError(f"op {self.op!r} needs a `value`")
        if self.op is None and self.value is not None:
            raise ValueError("`value` goes with `op`")
        return self

    @property
    def column(self) -> str:
        return self.field if self.field is not None else self.len  # type: ignore[return-value]

    def holds(self, value: Any) -> bool:
        """Does a row whose column holds `value` pass? TypeError when the value cannot be compared."""
        if self.len is not None:
            if not isinstance(value, (list, str)):
                raise TypeError(f"len: field {self.len!r} holds {type(value).__name__}, not a list or string")
            value = len(value)
        if self.in_ is not None:
            return value in self.in_
        if self.not_in is not None:
            return value not in self.not_in
        if self.regex is not None:
            return value is not None and re.search(self.regex, str(value)) is not None
        if value is None:
            return False
        return bool(_OPS[self.op](value, self.value))


class SplitSpec(Strict):
    """The rows of one task split (`id`, `ood`, ...) and its train/test partitions: either two
    dataset splits (`train:` for training, `test:` for evaluation) or one (`data:`), whose rows
    are divided by hashing each prompt with `holdout` the share held out for evaluation (0: train
    and evaluate on the same rows). `where` keeps only rows passing every rule."""

    train: str | None = None
    test: str | None = None
    data: str | None = None
    holdout: float = Field(0.0, ge=0, lt=1)
    where: list[Rule] = Field(default_factory=list)

    @field_validator("where", mode="before")
    @classmethod
    def _one_rule(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _shape(self) -> "SplitSpec":
        if self.data is not None:
            if self.train is not None or self.test is not None:
                raise ValueError("give either `data` (one dataset split, held out by hashing) or `train` and `test`")
        elif self.train is None or self.test is None:
            raise ValueError("give either `data` (one dataset split, held out by hashing) or both `train` and `test`")
        elif self.holdout:
            raise ValueError("`holdout` applies to `data`; with `train` and `test` the test split is held out")
        return self


class AnswerSpec(Strict):
    """Where a row's reference answer is: a field, and optionally a regex that cuts it out of that
    field's text (its last match; the group named `answer`, else group 1, else the whole match)."""

    field: str
    extract: RegexStr | None = None


class CompletionSpec(Strict):
    """How the answer is read from a model's completion: the whole completion (`extract: null`) or
    the last match of a regex (group `answer`, else 1, else 0); no match = malformed."""

    extract: RegexStr | None = None


class FormatSpec(Strict):
    """A solution format label and the regex that recognises it (searched in the completion)."""

    name: str
    regex: RegexStr


class TaskSpec(Strict):
    """A dataset task. Formats are tried in order and the first whose regex matches labels the
    completion; with no match the completion gets `default_format`, or is malformed when that is null."""

    name: str | None = None  # the task's name when given by file (`--task-spec`); default: the file name
    origin: str | None = None  # the file the spec was read from (set by the loader, for messages)
    source: Source
    splits: dict[str, SplitSpec]
    prompt: str
    answer: AnswerSpec | None = None
    completion: CompletionSpec = Field(default_factory=CompletionSpec)
    verifier: Verifier
    formats: list[FormatSpec] = Field(default_factory=lambda: [FormatSpec(name="default", regex=r"\S")])
    default_format: str | None = None
    # expert demonstrations: {format label: template of the reference solution}; none: no SFT on expert data
    solutions: dict[str, str] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        template_fields(v)
        return v

    @field_validator("solutions")
    @classmethod
    def _solutions(cls, v: dict[str, str]) -> dict[str, str]:
        for fmt, tpl in v.items():
            try:
                template_fields(tpl)
            except ValueError as e:
                raise ValueError(f"{fmt}: {e}") from None
        return v

    @field_validator("splits")
    @classmethod
    def _split_names(cls, v: dict[str, SplitSpec]) -> dict[str, SplitSpec]:
        if not v:
            raise ValueError("a task needs at least one split")
        bad = [s for s in v if not NAME.fullmatch(s)]
        if bad:
            raise ValueError(f"split name {bad[0]!r} must be letters, digits, '_', '.' or '-'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        labels = [f.name for f in self.formats]
        if not labels:
            raise ValueError("formats: give at least one format")
        if len(set(labels)) != len(labels):
            raise ValueError(f"formats: duplicate label in {labels}")
        for fmt in self.solutions:
            if fmt not in self.format_names:
                raise ValueError(f"solutions.{fmt}: not a format label (formats: {', '.join(self.format_names)})")
        if self.verifier.needs_answer and self.answer is None:
            raise ValueError(f"answer: verifier {self.verifier.type!r} needs the reference answer (answer.field)")
        return self

    @property
    def format_names(self) -> tuple[str, ...]:
        names = tuple(f.name for f in self.formats)
        if self.default_format is not None and self.default_format not in names:
            names += (self.default_format,)
        return names

    def columns(self) -> dict[str, str]:
        """Every row field the task reads, with the key of the spec that reads it."""
        used: dict[str, str] = {f: "prompt" for f in template_fields(self.prompt)}
        for fmt, tpl in self.solutions.items():
            used.update({f: f"solutions.{fmt}" for f in template_fields(tpl) if f not in used})
        if self.answer is not None:
            used.setdefault(self.answer.field, "answer.field")
        for f in sorted(self.verifier.fields()):
            used.setdefault(f, "verifier")
        for name, split in self.splits.items():
            for i, rule in enumerate(split.where):
                used.setdefault(rule.column, f"splits.{name}.where[{i}]")
        return used


# -- loading --------------------------------------------------------------------------------------

def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a task file holds a mapping (source, splits, prompt, answer, verifier, ...)")
    return data


def validate_spec(data: dict[str, Any], where: str) -> TaskSpec:
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{where}: {_one_line(e)}") from None


def load_task_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> TaskSpec:
    """Read and validate a task YAML; each top-level key of `overrides` replaces the file's (so
    `source: {data_files: ...}` swaps the whole source). Errors name the file and key."""
    path = Path(path)
    data = {**_read(path), **(overrides or {})}
    data["origin"] = str(path)
    return validate_spec(data, str(path))


def spec_name(path: str | Path) -> str:
    """The name a task file is known by: its `name:`, else the file name without extension."""
    name = _read(Path(path)).get("name") or Path(path).stem
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"{path}: name {name!r} must be letters, digits, '_', '.' or '-'")
    return name


def resolve_entries(entries: Any) -> Any:
    """The study config's `tasks:` mapping, with files read: each value is a path to a task YAML,
    `{file: PATH, <keys to override>}`, or an inline spec. Files become inline specs (so the
    resolved config is self-contained and its hash covers them)."""
    if not isinstance(entries, dict):
        return entries
    out: dict[str, Any] = {}
    for name, value in entries.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise UserError(f"tasks: task name {name!r} must be letters, digits, '_', '.' or '-'")
        if isinstance(value, (str, Path)):
            value = load_task_spec(value).model_dump(mode="json")
        elif isinstance(value, dict) and "file" in value:
            over = {k: v for k, v in value.items() if k != "file"}
            value = load_task_spec(value["file"], over).model_dump(mode="json")
        elif isinstance(value, dict):
            value = validate_spec(value, f"tasks.{name}").model_dump(mode="json")
        else:
            raise UserError(f"tasks.{name}: expected a task file path or a mapping, got {type(value).__name__}")
        out[name] = value
    return out


def file_list(data_files: Any) -> list[str]:
    """Every entry of `source.data_files` (paths, URLs, glob patterns) as one list."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in file_list(v)]
    return list(data_files)


def local_files(data_files: Any) -> list[str]:
    """The plain local paths among `source.data_files` (not URLs or glob patterns)."""
    import glob

    return [f for f in file_list(data_files) if "://" not in f and not glob.has_magic(f)]


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(src: Source) -> dict[str, str | None]:
    """sha256 of each local data file (None for a missing one: loading it reports the error)."""
    out: dict[str, str | None] = {}
    for f in local_files(src.data_files):
        try:
            st = os.stat(f)
        except OSError:
            out[f] = None
            continue
        out[f] = _sha256(os.path.abspath(f), st.st_size, st.st_mtime_ns)
    return out
