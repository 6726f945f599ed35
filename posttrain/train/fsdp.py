"""Fully sharded data parallel training: the policy's parameters, gradients and optimizer state
split over processes with FSDP2 (`torch.distributed.fsdp.fully_shard`), under `accelerate launch`
with `distributed_type: FSDP` (configs/accelerate/fsdp_cpu.yaml, fsdp_gpu.yaml).

Everything else is the data-parallel scheme of `train.distributed` (prompts sharded by rank, loss
reductions summed over ranks through `global_sum`), so the update is still the one-process update
on the global batch. What changes:

* each decoder layer (the classes a transformers model names in `_no_split_modules`) and then the
  root are `fully_shard`ed; forward all-gathers a layer's parameters, backward reduce-scatters its
  gradients. FSDP2 averages gradients over ranks by default; here every rank's gradient is already
  its share of the global loss's gradient (see `train.distributed`), so the reduction must SUM:
  divide factor 1 with sum-only collectives (gloo has no PREMUL_SUM), and no `all_reduce_grads`
  on the sharded parameters;
* sampling runs on full weights (`full_weights`): generation takes one forward per token, and
  ranks stop at different tokens, so per-layer all-gathers inside it would have to be matched
  across ranks token by token; gathering once, as TRL does for ZeRO-3 generation, keeps rollouts
  bit for bit those of the replicated (DDP) run, at the cost of holding the full policy per
  process while sampling;
* gradient clipping runs over the DTensor gradients, whose norm is the global one;
* checkpoints and `model/` hold the gathered full weights (`full_model_state`) in the usual
  safetensors layout, and the full optimizer state keyed by parameter name
  (`full_optimizer_state`), which every process reads back into its shard on resume.

The reference model and a separate PPO critic stay replicated (no gradient / `all_reduce_grads`).
accelerate itself does not switch to FSDP on CPU (its distributed type stays MULTI_CPU), so the
launch's FSDP settings are read from the environment its launcher sets, through accelerate's own
`FullyShardedDataParallelPlugin`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from posttrain.errors import UserError

HALF = {"bf16": torch.bfloat16}


@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool


def requested() -> FsdpSettings | None:
    """The FSDP settings of this launch (`accelerate launch` with distributed_type FSDP), or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    try:
        plugin = FullyShardedDataParallelPlugin()
    except (ValueError, TypeError) as e:
        raise UserError(f"accelerate fsdp_config: {str(e).splitlines()[0]}") from None
    if plugin.fsdp_version != 2:
        raise UserError(f"accelerate fsdp_config.fsdp_version: {plugin.fsdp_version}: the training loop shards with "
                        "FSDP2; set fsdp_version: 2")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) or getattr(plugin.cpu_offload, "offload_params", False):
        raise UserError("accelerate fsdp_config.fsdp_offload_params: true is not supported by the training loop")
    if plugin.activation_checkpointing:
        raise UserError("accelerate fsdp_config.fsdp_activation_checkpointing: true is not supported by the training loop")
    return FsdpSettings(reshard_after_forward=bool(plugin.reshard_after_forward))


def check_supported(cfg, method: str | None, *, critic_mode: str | None, half: str, dtype: str, device_type: str,
                    accelerate_precision: str) -> None:
    """A one-line `UserError` naming the key of each setting the sharded loop does not implement."""
    key = f"methods.{method}." if method else ""
    if cfg.lora is not None:
        raise UserError(f"{key}lora: LoRA is not supported under FSDP (launch with a DDP config)")
    if critic_mode == "shared":
        raise UserError(f"{key}critic: shared (a value head on the sharded policy's trunk) is not supported under "
                        "FSDP; use critic: separate")
    if cfg.rollout.backend != "builtin":
        raise UserError(f"{key}rollout.backend: {cfg.rollout.backend} is not supported under FSDP; use builtin")
    if half != "no" and device_type != "cuda":
        raise UserError(f"dtype: {dtype}: half precision under FSDP runs on GPUs only; use dtype: fp32 on {device_type}")
    if accelerate_precision != "no" and device_type != "cuda":
        raise UserError(f"accelerate mixed_precision: {accelerate_precision}: half precision under FSDP runs on GPUs "
                        "only; set mixed_precision: 'no'")
    if "fp16" in (half, accelerate_precision):
        raise UserError(f"{'dtype' if half == 'fp16' else 'accelerate mixed_precision'}: fp16 under FSDP needs loss "
                        "scaling, which the sharded loop does not do; use bf16")
    if accelerate_precision not in ("no", half):
        raise UserError(f"accelerate mixed_precision: {accelerate_precision}: under FSDP the precision is the "
                        f"study's dtype (now {dtype}); set mixed_precision: 'no' and dtype: {accelerate_precision}")


def _layers(model) -> list[torch.nn.Module]:
    """The outermost modules whose class the model names as unsplittable (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    out, taken = [], []
    for name, mod in model.named_modules():
        if name and type(mod).__name__ in names and not any(name.startswith(t + ".") for t in taken):
            out.append(mod)
            taken.append(name)
    return out


def shard(model, settings: FsdpSettings, device: torch.device, half: str = "no"):
    """`fully_shard` every decoder layer of `model`, then the root, over all processes; gradients
    are reduced as sums (see the module docstring). Returns the model (sharded in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    layers = _layers(model)
    if not layers:
        raise UserError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); FSDP cannot shard it")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # a bf16 study keeps fp32 master weights and computes in bf16, as autocast does in one process;
    # gradients are reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=HALF[half], reduce_dtype=torch.float32) if half != "no" else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=mp)
    # the root keeps its parameters between forward and backward (FSDP2's own default for a root,
    # made explicit so that `full_weights` can restore it)
    model.set_reshard_after_forward(False, recurse=False)
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.set_gradient_divide_factor(1.0)
            mod.set_force_sum_reduction_for_comms(True)
    model._posttrain_fsdp = settings
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_weights(model) -> Iterator[None]:
    """Within this block every process holds the full parameters of a sharded `model` and its
    forward passes communicate nothing, so processes may run different numbers of them (sampling,
    an evaluation on one process). Entered and left by all processes together. A model that is not
    sharded: nothing happens."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
        for m in mods:
            if m is not model:
                m.set_reshard_after_forward(model._posttrain_fsdp.reshard_after_forward, recurse=False)


def clip_grad_norm_(params, max_norm: float) -> float:
    """Clip the (DTensor) gradients of `params` to a global norm of `max_norm`; returns the global
    norm before clipping (every process gets the same)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The full weights of a sharded `model` on CPU, on process 0 (other processes get {}); called
    by all processes together. Tied copies (the LM head of a model tying it to the embedding) are
    left out, as `save_pretrained` leaves them out of an unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    for target in getattr(model, "all_tied_weights_keys", None) or {}:
        state.pop(target, None)
    return state


def full_optimizer_state(model, optimizer) -> dict:
    """The full optimizer state of a sharded `model` keyed by parameter name, on CPU, on process 0
    (other processes get {}); called by all processes together."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Put a full optimizer state (`full_optimizer_state`, read by every process) into this
    process's shard; called by all processes together."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def copy_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter that may be a shard (DTensor) of it: each process keeps
    its own block of `full` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(dst, DTensor):
        dst.copy_(distribute_tensor(full.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements,
                                    src_data_rank=None))
    else:
        dst.copy_(full.to(dst.dtype))
