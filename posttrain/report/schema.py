"""What the report needs from `results.json`, checked before rendering so that a hand-edited,
truncated or foreign file is a one-line error naming the file and the key, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.errors import UserError

Num = Optional[float]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelScores(_Open):
    id_acc: float
    ood_acc: float
    retention: dict[str, Num]
    format_share: dict[str, float]


class Finding(_Open):
    claim: str
    holds: Optional[bool]
    evidence: str


class Results(_Open):
    study: str
    seed: int
    wall_seconds: float
    id_task: str
    ood_task: str
    retention_tasks: list[str]
    models: dict[str, ModelScores] = Field(min_length=1)
    forgetting: dict[str, Num]
    findings: list[Finding] = Field(default_factory=list)
    diagnostics: dict[str, dict[str, Any]] = Field(default_factory=dict)
    diagnostic_pairs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    trajectories: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    training: dict[str, dict[str, Any]] = Field(default_factory=dict)
    repairs: dict[str, dict[str, Any]] = Field(default_factory=dict)


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (results.json, sweep.json); `UserError` naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object (a study's results.json is one)")
    return data


def read_results(path: Path) -> dict[str, Any]:
    """The parsed results.json, checked against `Results`; `UserError` naming the first problem."""
    data = read_object(path)
    try:
        Results.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "results"
        raise UserError(f"{path}: invalid results: {loc}: {first['msg']}") from None
    return data
