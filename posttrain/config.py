"""Typed configuration: every default lives here, presets and user YAML only override.

`load_study_config` reads a YAML file, applies `--set a.b=c` style overrides and validates the
result; any problem becomes a one-line `UserError` naming the offending field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from posttrain.errors import UserError
from posttrain.tasks import Task, build_task
from posttrain.tasks.spec import TaskSpec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """Architecture of a tiny from-scratch model (ignored when `base_model` points at a checkpoint)."""

    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(384, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = None
    max_length: int = Field(128, ge=16)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class TaskRef(Strict):
    """A task split, optionally with solution-format weights (empty = all formats equally)."""

    task: str
    split: str = "id"
    weight: float = Field(1.0, gt=0)
    formats: dict[str, float] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.split}"


class LmEvalRef(Strict):
    """A retention benchmark scored through lm-evaluation-harness on the model in process
    (`posttrain.evaluation.lm_eval_bridge`): `{lm_eval: mmlu, limit: 500}`."""

    lm_eval: str = Field(min_length=1)  # an lm-eval task, group or tag name
    limit: int | float | None = None  # examples per (sub)task; a float below 1 is a fraction; None: all
    num_fewshot: int | None = Field(None, ge=0)  # None: the task's own default
    metric: str | None = None  # "acc_norm", "exact_match,flexible-extract"; None: the task's first metric
    include_path: str | None = None  # a directory of local task YAMLs (their data must be local files)
    batch_size: int = Field(16, ge=1)

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        count = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        if v is not None and not (count or isinstance(v, float) and 0 < v < 1):
            raise ValueError(f"limit must be a count >= 1 or a fraction in (0, 1), not {v!r}")
        return v

    @model_validator(mode="after")
    def _known_task(self) -> "LmEvalRef":
        # offline: lm-eval's own task index (and the include_path) know every name it can run
        from posttrain.evaluation.lm_eval_bridge import resolve_task

        try:
            resolve_task(self.lm_eval, self.include_path)
        except UserError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def key(self) -> str:
        return f"lm_eval:{self.lm_eval}" + (f":{self.num_fewshot}shot" if self.num_fewshot is not None else "")


def _retention_kind(v: Any) -> str:
    return "lm_eval" if isinstance(v, LmEvalRef) or (isinstance(v, dict) and "lm_eval" in v) else "task"


# a retention probe: a built-in task split or an lm-eval task
RetentionRef = Annotated[Union[Annotated[TaskRef, Tag("task")], Annotated[LmEvalRef, Tag("lm_eval")]],
                         Discriminator(_retention_kind)]


def _default_mixture() -> list[TaskRef]:
    # The fine-tuning task (points24 under the training rule) is one skill among several, written
    # mostly as one expression ("eq") and sometimes step by step ("steps"): the base knows both.
    return [
        TaskRef(task="points24", split="id", weight=2.0, formats={"eq": 0.65, "steps": 0.35}),
        TaskRef(task="points24", split="ood", weight=2.0, formats={"eq": 0.65, "steps": 0.35}),
        TaskRef(task="arith", split="id", weight=2.0, formats={"direct": 0.2, "cot": 0.5, "code": 0.3}),
        TaskRef(task="facts", split="id", weight=2.0),
        TaskRef(task="strings", split="id", weight=1.0),
    ]


class PretrainConfig(Strict):
    """From-scratch pretraining on a weighted mixture of task splits and solution formats."""

    steps: int = Field(1200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixture: list[TaskRef] = Field(default_factory=_default_mixture)
    log_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(300, ge=0)  # resumable checkpoints under pretrain/checkpoints (0: none)


class TrainConfig(Strict):
    """One post-training method: an objective fed by a data source, in the shared loop.

    The fields below are the knobs every method has. Knobs of one objective, advantage estimator
    or data source (say `vf_coef` of PPO, `adv_norm_std` of the "grpo" estimator, `rounds` of
    filtered data) are declared by that registry entry's typed `Params` and set here by name, next
    to the shared ones; a knob that the method's objective, estimator and data source do not
    declare is an error naming it. Resolved values: `objective_params`, `estimator_params`,
    `data_params` (defaults filled in). Methods of the literature are settings of these knobs (see
    `METHOD_RECIPES`): SFT = sft on expert data; GRPO / RLOO / PPO = that objective on on-policy
    data; Expert Iteration = sft on filtered self-samples over several rounds; Self-SFT = one such
    round from the base.
    """

    # the knobs of the objective / estimator / data source are validated against their registries
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    objective: str = "sft"
    estimator: str | None = None  # advantage estimator (objectives that take one); None: the objective's default
    data: str | None = None  # None: the objective's natural source
    task: str = "points24"
    split: str = "id"
    # "base"; another method's final model ("sft" or "sft@end"), one of its kept checkpoints
    # ("sft@step-50"), or the kept checkpoint with its best OOD accuracy ("sft@peak_ood"); or a directory
    init: str = "base"
    steps: int = Field(150, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    # group size (RL); demos or kept samples per prompt (SFT). Canonical demos are identical, so they
    # are computed once per prompt (same loss and gradient) unless minibatches > 1
    samples_per_prompt: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, ge=1)
    num_iterations: int = Field(1, ge=1)  # mu: updates per batch (ratio != 1 from the second on)
    minibatches: int = Field(1, ge=1)  # each update's batch split in this many optimizer steps
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    # KL to the base model: always measured; penalised when kl_coef > 0, as a loss term or in the reward
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_mode: Literal["loss", "reward"] = "loss"
    # which parameters train: globs (or "re:REGEX"), optionally "@A-B" for layers A..B inclusive
    freeze: list[str] = Field(default_factory=list)
    train_only: list[str] = Field(default_factory=list)
    checkpoint_every: int = Field(0, ge=0)  # 0: only the final model
    log_every: int = Field(1, ge=1)
    trackers: list[str] = Field(default_factory=lambda: ["auto"])  # accelerate trackers; "auto": tensorboard if installed
    seed: int | None = None  # None: the study seed

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        from posttrain.train.objectives import OBJECTIVES

        if v not in OBJECTIVES:
            raise ValueError(f"unknown objective {v!r} (known: {', '.join(sorted(OBJECTIVES))})")
        return v

    @field_validator("data")
    @classmethod
    def _known_source(cls, v: str | None) -> str | None:
        from posttrain.train.data_sources import DATA_SOURCES

        if v is not None and v not in DATA_SOURCES:
            raise ValueError(f"unknown data source {v!r} (known: {', '.join(sorted(DATA_SOURCES))})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        obj = self.objective_cls
        if obj.estimator_level is None and self.estimator is not None:
            raise ValueError(f"estimator does not apply to objective {self.objective!r} (it uses no advantages)")
        if obj.estimator_level is not None:
            from posttrain.train.advantages import ESTIMATORS

            est = ESTIMATORS.get(self.estimator_name)
            if est is None:
                raise ValueError(f"unknown advantage estimator {self.estimator_name!r} (known: {', '.join(sorted(ESTIMATORS))})")
            if est.level != obj.estimator_level:
                raise ValueError(f"estimator {est.name!r} is {est.level}-level; objective {self.objective!r} "
                                 f"needs a {obj.estimator_level}-level one")
        if obj.traits.rl and self.data_source != "on_policy":
            raise ValueError(f"objective {self.objective!r} learns from rewards; it needs on_policy data, not {self.data_source!r}")
        if self.kl_mode == "reward" and not obj.traits.rl:
            raise ValueError(f"kl_mode 'reward' needs an objective that learns from rewards, not {self.objective!r}")
        self._check_knobs()
        if self.needs_groups and self.samples_per_prompt < 2:
            raise ValueError(f"{self.objective} needs samples_per_prompt >= 2 (a group)")
        if self.minibatches > self.prompts_per_step * self.samples_per_prompt:
            raise ValueError("minibatches cannot exceed the number of sequences per step")
        self.source_cls.check(self)
        return self

    def _owners(self) -> list[tuple[str, type[BaseModel]]]:
        """(description, Params model) of the registry entries this method uses."""
        out = [(f"objective {self.objective!r}", self.objective_cls.Params),
               (f"data source {self.data_source!r}", self.source_cls.Params)]
        if self.objective_cls.estimator_level is not None:
            out.append((f"estimator {self.estimator_name!r}", self.estimator_spec.params))
        return out

    def _check_knobs(self) -> None:
        extra = dict(self.model_extra or {})
        mine: set[str] = set()
        for _, model in self._owners():
            mine |= set(model.model_fields)
        for key in extra:
            if key in mine:
                continue
            owner = _knob_owner(key)
            if owner is None:
                raise ValueError(f"unknown field {key!r}")
            raise ValueError(f"{key} does not apply to objective {self.objective!r} with data {self.data_source!r}"
                             + (f" and estimator {self.estimator_name!r}" if self.objective_cls.estimator_level else "")
                             + f" (it is a knob of {owner})")
        for _, model in self._owners():
            try:
                model.model_validate({k: v for k, v in extra.items() if k in model.model_fields})
            except ValidationError as e:
                first = e.errors()[0]
                raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    def _params(self, model: type[BaseModel]) -> BaseModel:
        extra = self.model_extra or {}
        return model.model_validate({k: v for k, v in extra.items() if k in model.model_fields})

    @property
    def objective_cls(self):
        from posttrain.train.objectives import OBJECTIVES

        return OBJECTIVES[self.objective]

    @property
    def estimator_name(self) -> str | None:
        return self.estimator or self.objective_cls.default_estimator

    @property
    def estimator_spec(self):
        from posttrain.train.advantages import ESTIMATORS

        return ESTIMATORS[self.estimator_name] if self.estimator_name else None

    @property
    def data_source(self) -> str:
        return self.data or self.objective_cls.traits.default_data

    @property
    def source_cls(self):
        from posttrain.train.data_sources import DATA_SOURCES

        return DATA_SOURCES[self.data_source]

    @property
    def objective_params(self) -> BaseModel:
        return self._params(self.objective_cls.Params)

    @property
    def estimator_params(self) -> BaseModel | None:
        spec = self.estimator_spec
        return None if spec is None else self._params(spec.params)

    @property
    def data_params(self) -> BaseModel:
        return self._params(self.source_cls.Params)

    @property
    def needs_groups(self) -> bool:
        spec = self.estimator_spec if self.objective_cls.estimator_level else None
        return self.objective_cls.traits.needs_groups or bool(spec and spec.needs_groups)

    @property
    def is_rl(self) -> bool:
        """Learns from verifier rewards on its own samples (the findings' "RL method")."""
        return self.objective_cls.traits.rl

    @property
    def is_expert_sft(self) -> bool:
        return not self.is_rl and self.data_source == "expert"

    @property
    def kept_steps(self) -> list[int]:
        """The steps of the checkpoints this method keeps (`checkpoints/step-<N>/`)."""
        return list(range(self.checkpoint_every, self.steps + 1, self.checkpoint_every)) if self.checkpoint_every else []

    def resolved(self) -> dict[str, Any]:
        """Every knob of this method with its effective value (the run's resolved config)."""
        out = self.model_dump(mode="json")
        for _, model in self._owners():
            out.update(self._params(model).model_dump(mode="json"))
        out["estimator"] = self.estimator_name
        out["data"] = self.data_source
        return out


def _knob_owner(key: str) -> str | None:
    """Which registry entries declare `key` as a knob (for the error message), or None."""
    from posttrain.train.advantages import ESTIMATORS
    from posttrain.train.data_sources import DATA_SOURCES
    from posttrain.train.objectives import OBJECTIVES

    owners = [f"objective {n!r}" for n, c in OBJECTIVES.items() if key in c.Params.model_fields]
    owners += [f"estimator {n!r}" for n, e in ESTIMATORS.items() if key in e.params.model_fields]
    owners += [f"data source {n!r}" for n, c in DATA_SOURCES.items() if key in c.Params.model_fields]
    return ", ".join(owners) or None


@dataclass(frozen=True)
class InitRef:
    """Where a method starts when its `init` names another method of the study: that method's final
    model (`point` "end"), a kept checkpoint ("step-<N>") or its peak-OOD checkpoint ("peak_ood")."""

    method: str
    point: str

    @property
    def step(self) -> int | None:
        return int(self.point.removeprefix("step-")) if self.point.startswith("step-") else None


INIT_POINT = re.compile(r"step-([1-9][0-9]*)|peak_ood|end")


def init_ref(init: str, methods: dict[str, Any]) -> InitRef | None:
    """The method `init` names (`sft`, `sft@end`, `sft@step-50`, `sft@peak_ood`), or None for "base"
    or a directory. ValueError for `<x>@<point>` that is neither a reference to a method of `methods`
    with a known point nor an existing directory."""
    if init == "base":
        return None
    if init in methods:
        return InitRef(init, "end")
    name, at, point = init.rpartition("@")
    if not at or Path(init).exists():
        return None
    if name not in methods:
        raise ValueError(f"{init!r} names no method {name!r} of this study (methods: {', '.join(methods)})")
    if not INIT_POINT.fullmatch(point):
        raise ValueError(f"{init!r}: after '@' expected step-<N>, peak_ood or end, got {point!r}")
    return InitRef(name, point)


# Named recipes: `{method: ei}` in a study expands to these settings (explicit fields win).
METHOD_RECIPES: dict[str, dict[str, Any]] = {
    "sft": {"objective": "sft", "data": "expert"},
    "grpo": {"objective": "grpo", "data": "on_policy"},
    "dr_grpo": {"objective": "grpo", "data": "on_policy", "adv_norm_std": False, "loss_agg": "seq-mean-token-sum-norm"},
    "rloo": {"objective": "rloo", "data": "on_policy"},
    "ppo": {"objective": "ppo", "data": "on_policy"},
    "ei": {"objective": "sft", "data": "filtered", "rounds": 3},
    "ei_restart": {"objective": "sft", "data": "filtered", "rounds": 3, "restart_from_base": True},
    "self_sft": {"objective": "sft", "data": "filtered", "rounds": 1},
}


class EvalConfig(Strict):
    n_per_split: int = Field(400, ge=1)  # greedy accuracy on this many problems per task split
    pass_k: list[int] = Field(default_factory=lambda: [1, 4])
    n_samples: int = Field(8, ge=1)  # samples per problem for pass@k (k <= n_samples)
    n_sampled_problems: int = Field(64, ge=0)  # problems evaluated with sampling (0: skip)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _k_fits(self) -> "EvalConfig":
        bad = [k for k in self.pass_k if k < 1 or k > self.n_samples]
        if bad:
            raise ValueError(f"pass_k values {bad} must be in 1..n_samples ({self.n_samples})")
        return self


class KlConfig(Strict):
    """The KL of every trained model to the base on held-out prompts of its fine-tuning task
    (posttrain/evaluation/kl.py): `n_prompts` fixed test problems x `n_samples` completions at
    temperature 1, from the model and from the base. 0 prompts: skip it."""

    # 64 x 8 on the default study: about 2.4-3.2 CPU-seconds per model plus 1.6 for the base's side
    # (shared by the methods of a task split), standard errors 3-5% of the KL (bench/README.md#kl)
    n_prompts: int = Field(64, ge=0)
    n_samples: int = Field(8, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)  # None: eval.max_new_tokens
    batch_size: int = Field(256, ge=1)  # completions per sampling / scoring batch


def _default_repair_grid() -> list[dict[str, Any]]:
    # UV-merge with both operators at the same points: the published one (orthonormalize false, behind
    # the findings) and our QR variant; layer reset in the reference's scope behind the finding, and
    # the whole-layer reset beside it
    return [
        {"method": "uv_merge", "mode": "direction", "top": [0.05, 0.1, 0.2, 0.5, 1.0], "orthonormalize": [False, True]},
        {"method": "uv_merge", "mode": "direction", "top": 0.2, "bottom": 0.05, "orthonormalize": [False, True]},
        {"method": "uv_merge", "mode": "magnitude", "top": 1.0},
        {"method": "reset_layers", "scope": "reference", "first_frac": [0.25, 0.5]},
        {"method": "reset_layers", "scope": "layers", "first_frac": 0.25},
        {"name": "wise", "method": "interpolate", "alpha": [0.25, 0.5, 0.75]},
    ]


SOURCE_KINDS = ("base", "sft_peak_ood")


def source_label(source: str) -> str:
    """A repair source's name in repair names and results.json: "base", "sft_peak_ood", or a
    directory's last path component (non-identifier characters as "_")."""
    return source if source in SOURCE_KINDS else re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source).name) or "dir"


class RepairConfig(Strict):
    """A recovery sweep: repair the `damaged` method's model towards a source model, score each repair.

    Grid format: see `posttrain.repair.sweep` (one entry per method, list values are swept).
    """

    # the method whose model is repaired: "auto" = the study's first SFT-on-expert-data method (no
    # sweep when there is none); a method name; or None for no sweep
    damaged: str | None = "auto"
    # whose weights the repairs restore into the damaged model: "base" (the pretrained model),
    # "sft_peak_ood" (the damaged method's kept checkpoint with the best OOD accuracy, as the
    # reference code restores SFT_MaxOOD into SFT_END), or a checkpoint directory; a list sweeps
    # from each (the repairs' names then end in "@<source>")
    source: str | list[str] = "base"
    # the model whose OOD accuracy counts as fully recovered: "source" (the source the repair used),
    # "base", or a method of the study
    reference: str = "source"
    grid: list[dict[str, Any]] = Field(default_factory=_default_repair_grid)

    @field_validator("source")
    @classmethod
    def _valid_source(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("repair.source: an empty list (give at least one of base, sft_peak_ood or a directory)")
        for s in items:
            if s not in SOURCE_KINDS and not Path(s).is_dir():
                raise ValueError(f"repair.source: {s!r} is neither 'base', 'sft_peak_ood' nor a checkpoint directory")
        labels = [source_label(s) for s in items]
        if dup := sorted({x for x in labels if labels.count(x) > 1}):
            raise ValueError(f"repair.source lists {dup[0]!r} twice")
        return v

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @field_validator("grid")
    @classmethod
    def _valid_grid(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from posttrain.repair.sweep import validate_grid

        try:
            validate_grid(v)
        except UserError as e:
            raise ValueError(str(e)) from None
        return v


class DiagnosticsConfig(Strict):
    """Weight diagnostics of a study: every method's model against the base in one streamed pass
    (`posttrain.analysis.diff`), and, where methods kept `checkpoint_every` checkpoints, their
    trajectories over training steps."""

    spectral: bool = True  # singular values, principal angles, energy split (cheap on tiny models)
    top_frac: float | None = Field(None, gt=0, le=1)  # top-k as a fraction of min(m, n); None: 5%
    bins: int = Field(20, ge=2)  # spectrum ranges of the principal-angle curves
    trajectory: bool = True  # diagnostics of each method's step-<N> checkpoints, when there are any


class StudyConfig(Strict):
    """A whole study; see posttrain/presets/default.yaml for a commented example."""

    name: str = "default"
    seed: int = 0
    # several seeds: each runs the whole study under <out>/seed-<n>/ and <out>/results.json aggregates
    # them (posttrain/multiseed.py); None: one run of `seed` in <out> itself
    seeds: list[int] | None = None
    # processes that run those seeds side by side, each with cores // jobs threads ("auto": as many as
    # there are seeds and CPU cores, on CPU; 1 on an accelerator). Results are the same for any value:
    # training is bitwise reproducible at any thread count.
    jobs: int | Literal["auto"] = "auto"
    # axes of a sweep, config path -> values ("model.hidden_size: [64, 128]", list indices allowed,
    # "a.b+c.d" sets both paths); every combination is a study under <out>/cells/<name>/ (posttrain/study_sweep.py)
    sweep: dict[str, list[Any]] | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("seeds is empty (omit it to run the single `seed`)")
            if any(s < 0 for s in v) or len(set(v)) != len(v):
                raise ValueError(f"seeds must be distinct non-negative integers, got {v}")
        return v

    @field_validator("jobs")
    @classmethod
    def _jobs(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"jobs must be a positive number of processes or auto, got {v}")
        return v

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if v is not None:
            if not v:
                raise ValueError("sweep names no axis (omit it for a single study)")
            for axis, values in v.items():
                if not values:
                    raise ValueError(f"sweep axis {axis!r} has no values")
        return v
    base_model: str | None = None  # a checkpoint dir or hub id; None: pretrain a tiny model
    model: ModelConfig = Field(default_factory=ModelConfig)
    # task name -> constructor parameters; a task's own signature holds its defaults
    world: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # dataset tasks by name: a task YAML path, {file: PATH, <overrides>} or an inline spec (posttrain/tasks/spec.py)
    tasks: dict[str, TaskSpec] = Field(default_factory=dict)

    @field_validator("tasks", mode="before")
    @classmethod
    def _read_task_files(cls, v: Any) -> Any:
        from posttrain.tasks.spec import resolve_entries

        return resolve_entries(v)

    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    id_task: TaskRef = Field(default_factory=lambda: TaskRef(task="points24", split="id"))
    ood_task: TaskRef = Field(default_factory=lambda: TaskRef(task="points24", split="ood"))
    retention: list[RetentionRef] = Field(
        default_factory=lambda: [TaskRef(task="facts"), TaskRef(task="strings"), TaskRef(task="arith")]
    )
    methods: dict[str, TrainConfig] = Field(
        default_factory=lambda: {"sft": TrainConfig(objective="sft"), "grpo": TrainConfig(objective="grpo")}
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _expand_recipes(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for name, m in v.items():
            if isinstance(m, dict) and "method" in m:
                m = dict(m)
                recipe = m.pop("method")
                if recipe not in METHOD_RECIPES:
                    raise ValueError(f"methods.{name}: unknown method recipe {recipe!r} (known: {', '.join(METHOD_RECIPES)})")
                m = {**METHOD_RECIPES[recipe], **m}
            out[name] = m
        return out

    eval: EvalConfig = Field(default_factory=EvalConfig)
    kl: KlConfig = Field(default_factory=KlConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    repair: RepairConfig = Field(default_factory=RepairConfig)

    @model_validator(mode="after")
    def _check_refs(self) -> "StudyConfig":
        from posttrain.tasks import TASKS

        for name in self.tasks:
            if name in TASKS:
                raise ValueError(f"tasks.{name}: {name!r} is a built-in task; give the dataset task another name")
            if name in self.world:
                raise ValueError(f"world.{name}: dataset task {name!r} takes no parameters (its YAML holds them)")
        refs = [self.id_task, self.ood_task, *self.task_retention, *self.pretrain.mixture]
        refs += [TaskRef(task=m.task, split=m.split) for m in self.methods.values()]
        for ref in refs:
            task = self.make_task(ref.task)
            task.check_split(ref.split)
            for fmt in ref.formats:
                task.check_format(fmt)
        for i, ref in enumerate(self.pretrain.mixture if self.base_model is None else []):
            fmts = self.make_task(ref.task).solution_formats
            bad = [f for f in ref.formats if f not in fmts]
            if not fmts or bad:
                raise ValueError(f"pretrain.mixture.{i}: task {ref.task!r} has reference solutions in format(s) "
                                 f"{', '.join(fmts) or 'none'}, so it cannot be written in pretraining"
                                 + (f" as {', '.join(bad)}" if bad and fmts else ""))
        for name, m in self.methods.items():
            if not plain_name(name) or name == "base":
                raise ValueError(f"methods: {name!r} cannot name a method (it becomes a directory name: no '/', '\\', "
                                 "'.' or '..', and 'base' is the base model)")
            task = self.make_task(m.task)
            fmt = getattr(m.data_params, "expert_format", None)
            if fmt is not None:
                task.check_format(fmt)
            if m.is_expert_sft and not task.solution_formats:
                raise ValueError(f"methods.{name}: task {m.task!r} has no reference solutions, so it cannot be used "
                                 "for SFT on expert data")
            if m.is_expert_sft and fmt is not None and fmt not in task.solution_formats:
                raise ValueError(f"methods.{name}.expert_format: task {m.task!r} has reference solutions in format(s) "
                                 f"{', '.join(task.solution_formats)} only")
            self._check_init(name, m)
        keys = [r.key for r in self.lm_eval_retention]
        if dup := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"retention lists {dup[0]!r} twice (each lm_eval task once per num_fewshot)")
        if self.base_model is None:
            # the tiny model's context is known from the config: fail now, not after pretraining
            for key, n in [("eval.max_new_tokens", self.eval.max_new_tokens),
                           *((f"methods.{k}.max_new_tokens", m.max_new_tokens) for k, m in self.methods.items())]:
                if n >= self.model.max_length:
                    raise ValueError(f"{key}={n} does not fit the model's context (model.max_length={self.model.max_length})")
        rep = self.repair
        if rep.damaged not in (None, "auto") and rep.damaged not in self.methods:
            raise ValueError(f"repair.damaged: {rep.damaged!r} is not a method of this study "
                             "(set repair.damaged: null to skip the recovery sweep)")
        if rep.reference not in ("source", "base", *self.methods):
            raise ValueError(f"repair.reference: {rep.reference!r} is neither 'source', 'base' nor a method of this study")
        damaged = self.damaged_method
        if "sft_peak_ood" in rep.sources and damaged is not None and not self.methods[damaged].checkpoint_every:
            raise ValueError(f"repair.source sft_peak_ood needs the damaged method {damaged!r} to keep checkpoints "
                             f"(set methods.{damaged}.checkpoint_every > 0)")
        from posttrain.study import method_order  # cycles of `init` references

        try:
            method_order(self)
        except UserError as e:
            raise ValueError(str(e)) from None
        return self

    def _check_init(self, name: str, m: TrainConfig) -> None:
        where = f"methods.{name}.init"
        try:
            ref = init_ref(m.init, self.methods)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if ref is None:
            if m.init != "base" and not Path(m.init).exists():
                raise ValueError(f"{where}: {m.init!r} is neither 'base', a method, <method>@<checkpoint>, nor a directory")
            return
        if ref.method == name:
            raise ValueError(f"{where}: {m.init!r} refers to the method itself")
        src = self.methods[ref.method]
        if ref.point == "peak_ood" and not src.checkpoint_every:
            raise ValueError(f"{where}: {m.init!r} needs {ref.method} to keep checkpoints "
                             f"(set methods.{ref.method}.checkpoint_every > 0)")
        if ref.step is not None and ref.step not in src.kept_steps:
            kept = src.kept_steps
            have = (f"it keeps step-{kept[0]} to step-{kept[-1]} every {src.checkpoint_every}" if kept
                    else "it keeps no checkpoints (checkpoint_every: 0)")
            raise ValueError(f"{where}: {ref.method} keeps no step-{ref.step} ({have}, steps {src.steps})")

    @property
    def damaged_method(self) -> str | None:
        """The method whose model the recovery sweep repairs (see RepairConfig.damaged)."""
        if self.repair.damaged != "auto":
            return self.repair.damaged
        return next((name for name, m in self.methods.items() if m.is_expert_sft), None)

    @property
    def checkpoint_eval_methods(self) -> list[str]:
        """Methods whose kept checkpoints are evaluated on the in-domain and OOD sets: SFT on expert
        data, methods whose peak-OOD checkpoint another method starts from, and the damaged method of
        a repair sweep from its peak-OOD checkpoint (all only when they keep checkpoints)."""
        want = {n for n, m in self.methods.items() if m.is_expert_sft}
        for m in self.methods.values():
            ref = init_ref(m.init, self.methods)
            if ref is not None and ref.point == "peak_ood":
                want.add(ref.method)
        if "sft_peak_ood" in self.repair.sources and self.repair.damaged is not None and self.damaged_method:
            want.add(self.damaged_method)
        return [n for n, m in self.methods.items() if n in want and m.checkpoint_every]

    @property
    def task_retention(self) -> list[TaskRef]:
        """The retention probes that are built-in task splits."""
        return [r for r in self.retention if isinstance(r, TaskRef)]

    @property
    def lm_eval_retention(self) -> list[LmEvalRef]:
        """The retention probes run through lm-evaluation-harness."""
        return [r for r in self.retention if isinstance(r, LmEvalRef)]

    def make_task(self, name: str) -> Task:
        """The task called `name`: a dataset task of `tasks`, else a built-in one with `world` parameters."""
        if name in self.tasks:
            from posttrain.tasks.dataset import DatasetTask

            return DatasetTask(name, self.tasks[name])
        return build_task(name, self.world.get(name, {}))

    @property
    def world_key(self) -> Any:
        """What stage hashes see of the task world: `world` alone when there are no dataset tasks, else
        also their specs and the contents of their local data files (so changed data is not cached)."""
        if not self.tasks:
            return self.world
        from posttrain.tasks.spec import data_fingerprint

        return {"world": self.world, "tasks": {k: {"spec": v.model_dump(mode="json", exclude={"origin"}),
                                                   "data": data_fingerprint(v.source)} for k, v in self.tasks.items()}}


def plain_name(name: str) -> bool:
    """Whether `name` is usable as one directory name (it cannot climb out of or into another directory)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for `dotted = "a.b.c"`, creating dicts on the way."""
    keys = dotted.split(".")
    if not all(k.strip() for k in keys):
        raise UserError(f"override key {dotted!r} has an empty component (expected e.g. methods.sft.lr)")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` with the value read as YAML (so numbers, bools and lists work)."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    return f"invalid config: {loc}: {msg}{more}"


def build_study_config(data: dict[str, Any], overrides: list[str] = ()) -> StudyConfig:
    """Validate `data`, then apply `key.path=value` overrides to the fully resolved config (so an
    override changes one field and keeps every default around it) and validate again."""
    try:
        cfg = StudyConfig.model_validate(data)
        if not overrides:
            return cfg
        resolved = cfg.model_dump(mode="json")
        for item in overrides:
            set_path(resolved, *parse_override(item))
        return StudyConfig.model_validate(resolved)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: top level must be a mapping")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_study_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A study YAML with its `extends:` resolved: the named packaged preset (`extends: default`) or
    YAML file (relative to this one) is read first and this file's keys merge on top of it."""
    p = Path(path)
    data = read_yaml(p)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{p}: extends must be a preset name or a YAML path, got {parent!r}")
    target = (p.parent / parent) if parent.endswith((".yaml", ".yml")) else preset_path(parent)
    if target.resolve() in _seen or target.resolve() == p.resolve():
        raise UserError(f"{p}: extends forms a cycle through {target}")
    return deep_merge(read_study_yaml(target, (*_seen, p.resolve())), data)


def load_study_config(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    return build_study_config(read_study_yaml(path), overrides)


PRESETS_DIR = Path(__file__).parent / "presets"


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise UserError(f"unknown preset {name!r} (known: {', '.join(known)})")
    return path


def config_hash(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
