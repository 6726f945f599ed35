"""The one training loop every post-training method runs through.

A method = an objective (`train.objectives`) fed by a data source (`train.data_sources`). The
optimizer, schedule, prompt order, step budget, freezing rules and checkpoint format are shared, so
two methods differ only in the knobs their configs set. Per step:

    batch  <- data source (expert demos | on-policy rollouts | filtered self-samples)
    old    <- policy outputs before any update (log-probs, values); ref <- base log-probs
    prepare: advantages / returns from rewards (and KL-in-reward when asked)
    num_iterations x minibatches updates of the objective's loss

Checkpoints every `checkpoint_every` steps resume bit for bit (see `train.checkpointing`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from accelerate import Accelerator
from transformers import get_scheduler

from posttrain.config import TrainConfig
from posttrain.errors import TrainingDiverged, UserError
from posttrain.io import atomic_write_json, atomic_write_text, strict_json, versions
from posttrain.models.loading import check_generation_fits, load_model, save_checkpoint
from posttrain.tasks import Problem, Task
from posttrain.train.checkpointing import (CRITIC_DIR, CriticState, latest_checkpoint, load_weights_into, resume_latest,
                                           save_training_checkpoint)
from posttrain.train import distributed as ddp
from posttrain.train import fsdp
from posttrain.train.data_sources import DATA_SOURCES, Batch, SourceContext, prompt_schedule, score, step_seed, verdict_metrics
from posttrain.train.freezing import apply_freezing
from posttrain.train.lora import attach as attach_lora
from posttrain.train.lora import merged_state_dict
from posttrain.train.vllm_rollout import ENGINE_ATTR, VllmEngine, resolve_backend
from posttrain.train.objectives import OBJECTIVES, PolicyOutputs
from posttrain.train.policy import Critic, ValueHead, policy_forward
from posttrain.train.rollout import generate


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # foreach=False: the per-tensor path gives the same numbers whatever the grouping of tensors
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False)


def make_scheduler(optimizer, schedule: str, warmup: int, steps: int):
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def resolve_trackers(trackers: list[str]) -> list[str]:
    out = []
    for t in trackers:
        if t == "auto":
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                out.append("tensorboard")
        elif t not in ("none", ""):
            out.append(t)
    return out


def make_accelerator(device: str = "auto", trackers: list[str] = (), project_dir: Path | None = None,
                     mixed_precision: str = "no") -> Accelerator:
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    log_with = resolve_trackers(list(trackers))
    try:
        # mixed_precision only when asked: naming "no" would clash with a process-wide AcceleratorState
        # that another trainer (TRL, in the same process) set up first
        half = {} if cpu or mixed_precision == "no" else {"mixed_precision": mixed_precision}
        return Accelerator(cpu=cpu, log_with=log_with or None, project_dir=str(project_dir) if project_dir else None,
                           **half)
    except (ValueError, ImportError) as e:
        raise UserError(f"cannot set up trackers {log_with}: {str(e).splitlines()[0]}") from None


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    model_dir: Path
    metrics_path: Path
    steps: int
    wall_seconds: float
    trainable_params: int
    total_params: int


@torch.no_grad()
def quick_eval(model, tok, tasks: dict[str, Task], problems: dict[str, list[Problem]], max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy on small fixed problem sets, for training curves."""
    out = {}
    was_training = model.training
    model.eval()
    for key, probs in problems.items():
        task = tasks[key.split("/")[0]]
        ro = generate(model, tok, [p.prompt for p in probs], n=1, max_new_tokens=max_new_tokens, greedy=True)
        out[f"eval/{key}/acc"] = verdict_metrics(score(task, probs, ro.texts, ro.finished))["reward"]
    model.train(was_training)
    return out


def _slice(o: PolicyOutputs, idx: torch.Tensor, width: int) -> PolicyOutputs:
    cut = lambda x: None if x is None else x[idx.to(x.device)][:, : width - 1]  # noqa: E731
    return PolicyOutputs(cut(o.logp), cut(o.entropy), cut(o.values))


def _check_finite(value: float, what: str, step: int, out_dir: Path) -> None:
    if not math.isfinite(value):
        last = latest_checkpoint(out_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written (set checkpoint_every)"
        raise TrainingDiverged(f"non-finite {what} at step {step + 1}; training stopped, {where}")


def train(
    cfg: TrainConfig,
    *,
    init_dir: str | Path,
    ref_dir: str | Path | None,
    out_dir: str | Path,
    task: Task,
    expert_format: str | None,
    seed: int,
    curve_tasks: dict[str, Task] | None = None,
    curve_problems: dict[str, list[Problem]] | None = None,
    curve_every: int = 0,
    device: str = "auto",
    resume: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    method: str | None = None,
    load_options: dict | None = None,
) -> TrainResult:
    """Train one method from `init_dir`; write `out_dir/model` (final HF checkpoint),
    `out_dir/checkpoints/step-N` every `cfg.checkpoint_every` steps and `out_dir/metrics.jsonl`.
    With `resume`, continue from the latest checkpoint under `out_dir` when there is one.
    `method` (its name in the study) only makes error messages name the config key. `load_options`:
    `load_model` keywords of the policy and reference (dtype, chat_template)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    seed_everything(seed)
    objective = OBJECTIVES[cfg.objective]()
    # every input is checked before anything is written to out_dir
    opts = dict(load_options or {})
    # a half-precision study trains fp32 master weights under autocast (GPU): an update of lr 1e-6 to
    # a bf16 weight of 0.02 would round away; the reference is loaded in the study's dtype
    half = {"bf16": "bf16", "fp16": "fp16"}.get(opts.get("dtype", "fp32"), "no")
    model, tok = load_model(init_dir, device="cpu", **{**opts, "dtype": "fp32"} if half != "no" else opts)
    frz = apply_freezing(model, cfg.freeze, cfg.train_only)
    lora = None
    if cfg.lora is not None:
        lora = attach_lora(model, cfg.lora, f"methods.{method}.lora" if method else "lora")
        frz = dataclasses.replace(frz, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    ref = None
    if ref_dir is not None:
        ref, _ = load_model(ref_dir, device="cpu", **opts)
        ref.requires_grad_(False)
    # PPO's critic: a separate model from the init's trunk (default) or a value head on the policy's
    critic_mode = getattr(cfg.objective_params, "critic", "separate") if objective.traits.needs_critic else None
    critic_lr = getattr(cfg.objective_params, "critic_lr", None) or cfg.lr
    value_head = ValueHead(model.config.hidden_size) if critic_mode == "shared" else None
    critic_model = Critic.from_checkpoint(init_dir) if critic_mode == "separate" else None
    max_length = getattr(model.config, "max_position_embeddings", None)
    schedule = prompt_schedule(task, cfg.split, seed, cfg.steps, cfg.prompts_per_step)
    curve_prompts = [p.prompt for ps in (curve_problems or {}).values() for p in ps] if curve_every else []
    check_generation_fits(model, tok, [p.prompt for ps in schedule for p in ps] + curve_prompts, cfg.max_new_tokens,
                          f"methods.{method}.max_new_tokens" if method else "max_new_tokens")
    accelerator = make_accelerator(device, cfg.trackers, out_dir / "logs", mixed_precision=half)
    multi = accelerator.num_processes > 1  # data parallel: see train.distributed
    sharding = fsdp.requested() if multi else None  # FSDP: see train.fsdp
    if multi:
        _check_shardable(cfg, accelerator.num_processes, method)
        if sharding is not None:
            fsdp.check_supported(cfg, method, critic_mode=critic_mode, half=half, dtype=opts.get("dtype", "fp32"),
                                 device_type=accelerator.device.type, accelerate_precision=accelerator.mixed_precision)
        elif accelerator.distributed_type.value not in ("MULTI_CPU", "MULTI_GPU"):
            # the loop replicates the model (data parallel); FSDP/DeepSpeed would need it sharded
            raise UserError(f"accelerate distributed_type {accelerator.distributed_type.value} is not supported by "
                            "the training loop; launch with a DDP or FSDP config of configs/accelerate/")
        elif half == "fp16":
            # accelerator.backward would scale the loss for an optimizer the loop never prepares (unscales)
            raise UserError("dtype: fp16 under several processes needs loss scaling, which the data-parallel loop "
                            "does not do; use bf16")
    ddp.barrier()  # every process has checked its inputs (and the CLI its --out) before anything is written
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.resolved(), sort_keys=False))
        atomic_write_json(out_dir / "versions.json", versions())
    source = cfg.source_cls.build(cfg, SourceContext(task, seed, max_length, schedule, out_dir, expert_format))

    if sharding is not None:
        model = fsdp.shard(model, sharding, accelerator.device, half)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = params
    if value_head is not None:
        head = list(value_head.parameters())
        groups = params + head if critic_lr == cfg.lr else [{"params": list(params)}, {"params": head, "lr": critic_lr}]
        params += head
    optimizer = make_optimizer(groups, cfg.lr, cfg.weight_decay)
    updates_per_step = cfg.num_iterations * cfg.minibatches
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup_steps * updates_per_step, cfg.steps * updates_per_step)
    if multi:
        # no DDP wrapper and no prepared scheduler (which steps once per process): gradients are
        # summed by train.distributed.all_reduce_grads (FSDP: reduce-scattered), the schedule steps once per update
        # (the study's dtype sets the precision: bf16 autocast as accelerator.prepare would apply it)
        model = model if sharding is not None else ddp.autocast_forward(model.to(accelerator.device), accelerator)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    critic = None
    if critic_model is not None:
        # its own optimizer, schedule and gradient clipping: value-loss gradients never reach the policy
        c_opt = make_optimizer(list(critic_model.parameters()), critic_lr, cfg.weight_decay)
        c_sched = make_scheduler(c_opt, cfg.schedule, cfg.warmup_steps * updates_per_step, cfg.steps * updates_per_step)
        critic = CriticState(ddp.autocast_forward(critic_model.to(accelerator.device), accelerator), c_opt, c_sched) \
            if multi else \
            CriticState(*accelerator.prepare(critic_model, c_opt, c_sched))
        critic.module.train()
    dev = accelerator.device
    if ref is not None:
        ref = ref.to(dev)
    if value_head is not None:
        value_head.to(dev)
    policy = accelerator.unwrap_model(model)
    saved = policy if lora is None else lora  # LoRA: checkpoints hold the merged weights (and the adapters)
    backend, backend_label = resolve_backend(cfg.rollout.backend, dev.type, accelerator.num_processes)
    if backend == "vllm":
        weights = (lambda: merged_state_dict(policy).items()) if lora is not None else (lambda: policy.state_dict().items())
        setattr(policy, ENGINE_ATTR, VllmEngine(
            init_dir, weights, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            max_model_len=cfg.rollout.max_model_len or max_length, seed=seed,
            dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(half, next(policy.parameters()).dtype)))
    critic_io = None if critic is None else CriticState(accelerator.unwrap_model(critic.module), critic.optimizer,
                                                        critic.scheduler)

    metrics_path = out_dir / "metrics.jsonl"
    start = resume_latest(out_dir, saved, optimizer, scheduler, metrics_path, value_head, critic_io,
                          truncate=main) if resume else 0
    if resume and not start and (out_dir / "model" / "config.json").is_file() and (out_dir / "train.json").is_file():
        raise UserError(f"{out_dir} already holds a finished run (model/); nothing to resume")
    ddp.barrier()  # the main process has truncated metrics.jsonl before any process goes on
    log = metrics_path.open("a" if start else "w") if main else None
    hparams = {k: v for k, v in cfg.model_dump(mode="json").items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("posttrain", config=hparams)
    curve_tasks = curve_tasks or {}

    def log_line(row: dict) -> None:
        if not main:
            return
        log.write(strict_json(row) + "\n")
        log.flush()
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=row["step"])
        if on_step:
            on_step(row["step"], row)

    def curve(row: dict) -> None:
        with fsdp.full_weights(model):  # sharded: every process gathers, the main one evaluates
            if main:
                row.update(quick_eval(policy, tok, curve_tasks, curve_problems, cfg.max_new_tokens))

    if start == 0:
        first = {"step": 0, "trainable_params": frz.trainable, "total_params": frz.total}
        if curve_every and curve_problems:
            curve(first)
        log_line(first)

    model.train()
    for step in range(start, cfg.steps):
        ts = time.time()
        with fsdp.full_weights(model) if cfg.source_cls.on_policy else contextlib.nullcontext():
            batch = source.batch(step, schedule[step], cfg.samples_per_prompt, policy, tok, cfg)
        if source.round_start(step):
            # Echo Chamber / ReST-EM: the round's data came from the latest policy, training restarts from init
            lora.reset() if lora is not None else load_weights_into(policy, Path(init_dir))
            getattr(optimizer, "optimizer", optimizer).state.clear()
        row: dict = {"step": step + 1}
        if batch is None:
            with warnings.catch_warnings():
                # the schedule advances over a step with no data so every method sees the same lr at step t
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(updates_per_step):
                    scheduler.step()
                    if critic is not None:
                        critic.scheduler.step()
            row.update({"skipped": 1, "lr": scheduler.get_last_lr()[0]})
        else:
            row.update(_update(cfg, objective, model, ref, value_head, batch, optimizer, scheduler, accelerator,
                               params, step, seed, out_dir, critic, sharding is not None))
        row["step_seconds"] = time.time() - ts
        row = ddp.mean_metrics(row)
        if curve_every and curve_problems and ((step + 1) % curve_every == 0 or step + 1 == cfg.steps):
            curve(row)
        log_line(row)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            rng = ddp.gather_objects(torch.get_rng_state())
            full = (fsdp.full_model_state(model), fsdp.full_optimizer_state(model, optimizer)) if sharding else (None,) * 2
            if main:
                save_training_checkpoint(out_dir / "checkpoints" / f"step-{step + 1}", saved, tok, optimizer,
                                         scheduler, step + 1, value_head, critic_io, rng if multi else None, *full)
            ddp.barrier()
    policy.__dict__.pop(ENGINE_ATTR, None)
    model_dir = out_dir / "model"
    result = TrainResult(model_dir, metrics_path, cfg.steps, time.time() - t0, frz.trainable, frz.total)
    final_weights = fsdp.full_model_state(model) if sharding else None
    if not main:
        ddp.barrier()  # returns once the main process has written every output
        accelerator.end_training()  # (which ends the process group)
        return result
    log.close()
    model_dir = result.model_dir = save_checkpoint(saved, tok, out_dir / "model", final_weights)
    if value_head is not None:
        value_head.save(out_dir / "value_head.safetensors")
    if critic_io is not None:
        critic_io.module.save(out_dir / CRITIC_DIR)  # beside model/, never inside it
    result.wall_seconds = time.time() - t0
    atomic_write_json(out_dir / "train.json", {
        "steps": cfg.steps, "wall_seconds": result.wall_seconds, "objective": cfg.objective, "data": cfg.data_source,
        "expert_format": expert_format if cfg.data_source == "expert" else None, "resumed_from_step": start or None,
        "trainable_params": frz.trainable, "total_params": frz.total, "rollout_backend": backend_label,
        **({"processes": accelerator.num_processes, "parallelism": "fsdp" if sharding else "ddp"} if multi else {}),
    })
    ddp.barrier()
    accelerator.end_training()
    return result


def _check_shardable(cfg: TrainConfig, world: int, method: str | None) -> None:
    """Several processes split each step's prompts into equal blocks of whole prompt groups."""
    key = f"methods.{method}." if method else ""
    if not cfg.source_cls.sharded:
        raise UserError(f"{key}data: {cfg.data_source} runs in one process only (data sources that shard "
                        f"over processes: {', '.join(n for n, c in DATA_SOURCES.items() if c.sharded)})")
    if cfg.prompts_per_step % world:
        raise UserError(f"{key}prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of "
                        f"processes ({world})")


def _update(cfg: TrainConfig, objective, model, ref, value_head, batch: Batch, optimizer, scheduler, accelerator,
            params, step: int, seed: int, out_dir: Path, critic: CriticState | None = None, sharded: bool = False) -> dict:
    """All optimizer updates of one step on one batch; returns the step's metrics. `sharded`: the
    policy is FSDP-sharded (`train.fsdp`)."""
    dev = accelerator.device
    temp = objective.logit_temperature(cfg)  # the reference's log-probs too: the KL compares like with like
    values_from = value_head if critic is None else critic.module
    batch.packed = batch.packed.to(dev)
    if batch.rewards is not None:
        _check_finite(ddp.sum_scalar(float(batch.rewards.sum())), "reward", step, out_dir)
    ref_logp = None
    if ref is not None:
        with torch.no_grad():
            ref_logp = policy_forward(ref, batch.packed, temp).logp
    single = cfg.num_iterations == 1 and cfg.minibatches == 1
    if single:
        # one update: the behaviour policy is the current one, so old = current (ratio exactly 1)
        # sharded: no forward split by groups, whose number of passes could differ between processes
        new = policy_forward(model, batch.packed, temp, objective.traits.needs_entropy, values_from,
                             None if sharded else objective.grad_groups(batch, cfg))
        old = PolicyOutputs(new.logp.detach(), None, None if new.values is None else new.values.detach())
    else:
        # minibatches are padded row subsets: the old log-probs come from the same layout, so the
        # first ratio is 1 to the last bit
        with torch.no_grad():
            old = policy_forward(model, batch.packed.padded(), temp, False, values_from)
    with ddp.reducing():
        targets, metrics = objective.prepare(batch, old, ref_logp, cfg)
    n = batch.packed.input_ids.shape[0]
    losses = []
    out = None
    for it in range(cfg.num_iterations):
        order = list(range(n))
        if cfg.minibatches > 1:
            random.Random(step_seed(seed, step * 1000 + it, "minibatch")).shuffle(order)
        for k in range(cfg.minibatches):
            idx = sorted(order[k * n // cfg.minibatches : (k + 1) * n // cfg.minibatches])
            if single:
                sub, sub_old, sub_ref, sub_targets = batch, old, ref_logp, targets
            else:
                sub = batch.select(idx)
                width = sub.packed.input_ids.shape[1]
                t = torch.tensor(idx)
                sub.packed = sub.packed.to(dev)
                sub_old = _slice(old, t, width)
                sub_ref = None if ref_logp is None else ref_logp[t.to(dev)][:, : width - 1]
                sub_targets = targets.select(t, width)
                new = policy_forward(model, sub.packed, temp, objective.traits.needs_entropy, values_from)
            with ddp.reducing():
                out = objective.compute(new, sub_old, sub_ref, sub, sub_targets, cfg)
            loss_value = float(out.loss.detach())
            _check_finite(loss_value, "loss", step, out_dir)
            accelerator.backward(out.loss)
            if not sharded:  # FSDP reduce-scattered the policy's gradients as sums in backward
                ddp.all_reduce_grads(params)
            if critic is not None:
                ddp.all_reduce_grads(critic.module.parameters())
            grad_norm = fsdp.clip_grad_norm_(params, cfg.max_grad_norm) if sharded else \
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if critic is not None:
                metrics["critic_grad_norm"] = float(accelerator.clip_grad_norm_(critic.module.parameters(),
                                                                                cfg.max_grad_norm))
                critic.optimizer.step()
                critic.scheduler.step()
                critic.optimizer.zero_grad(set_to_none=True)
                metrics["critic_lr"] = critic.scheduler.get_last_lr()[0]
            losses.append(loss_value)
    return {"loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
            **metrics, **(out.metrics if out else {}), **batch.metrics}
