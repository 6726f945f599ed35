"""Data-parallel training across processes (`accelerate launch --num_processes N`).

What makes N processes compute the update of one process on the same global batch:

* prompts are sharded by rank in contiguous blocks (`shard_range`): a prompt's group of samples
  lives on one rank, so group statistics (GRPO, RLOO) never need communication;
* whole-batch reductions of the losses (token-mean normalisers, sequence means, PPO's advantage
  whitening) sum their numerators and denominators over ranks while `reducing()` is active
  (`global_sum`), so every rank computes the global loss value;
* `global_sum` passes the gradient straight through (identity backward): rank r's parameter
  gradient is dL/dS_global * dS_r/dtheta, and summing those over ranks (`all_reduce_grads`) gives
  the full dL/dtheta. No DDP wrapper is used, so no wrapper averages gradients or steps the
  schedule once per process as accelerate's prepared scheduler would.

With one process every function here is the identity and nothing is communicated, so a
single-process run is bitwise the same as before this module existed.
"""

from __future__ import annotations

import contextlib
import os
import contextvars
from typing import Iterator

import torch
import torch.distributed as dist

_REDUCING = contextvars.ContextVar("posttrain_reducing", default=False)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Rank 0; also after the process group has ended, from the launcher's RANK variable."""
    if world_size() > 1:
        return rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _comm_device() -> torch.device:
    """Where collectives run: NCCL (GPU launches) only moves CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard_range(n: int, world: int, r: int) -> tuple[int, int]:
    """The contiguous block [lo, hi) of `n` items owned by rank `r` of `world` (n % world == 0)."""
    if n % world:
        raise ValueError(f"{n} items do not split evenly over {world} processes")
    per = n // world
    return r * per, (r + 1) * per


def rank_block(items: list) -> tuple[list, tuple[int, int] | None]:
    """This rank's contiguous block of `items` and `generate`'s `shard` for it, (offset, total);
    one process: all items and None."""
    if world_size() == 1:
        return items, None
    lo, hi = shard_range(len(items), world_size(), rank())
    return items[lo:hi], (lo, len(items))


@contextlib.contextmanager
def reducing() -> Iterator[None]:
    """Within this block, the loss reductions of `train.objectives` are over all ranks' rows."""
    token = _REDUCING.set(world_size() > 1)
    try:
        yield
    finally:
        _REDUCING.reset(token)


def reducing_over_ranks() -> bool:
    return _REDUCING.get()


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        out = t.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    @staticmethod
    def backward(ctx, grad):
        return grad


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """sum over ranks of `t` inside `reducing()` (gradient: identity, see the module docstring);
    `t` itself otherwise."""
    if not _REDUCING.get():
        return t
    return _SumOverRanks.apply(t)


def sum_scalar(x: float) -> float:
    """A float summed over ranks (1 process: `x`)."""
    if world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t[0])


def all_reduce_grads(params) -> None:
    """Sum the gradients of `params` over ranks in one flat float64 buffer (a parameter without a
    gradient on this rank contributes zeros)."""
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for p in params]).to(_comm_device())
    dist.all_reduce(flat)
    i = 0
    for p in params:
        k = p.numel()
        g = flat[i : i + k].view_as(p).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        i += k


def mean_metrics(row: dict) -> dict:
    """The mean over ranks of every numeric metric (a key missing on a rank counts as 0 there,
    as a format share no sample of that rank had); ranks hold equal numbers of rows, so the mean
    of per-rank means is the global mean, and values already global stay as they are."""
    if world_size() == 1:
        return row
    rows: list = [None] * world_size()
    dist.all_gather_object(rows, row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r.get(k, 0.0) for r in rows]
        if k != "step" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            # equal values (already global: the loss, lr, grad norm) stay bit for bit what they are
            out[k] = vals[0] if len(set(vals)) == 1 else sum(float(v) for v in vals) / len(vals)
        else:
            out[k] = rows[0].get(k, vals[0])
    return out


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (1 process: [obj])."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def global_done(local_done: torch.Tensor) -> torch.Tensor:
    """Element-wise OR over ranks of a bool vector (each rank sets its own rows)."""
    if world_size() == 1:
        return local_done
    t = local_done.to(device=_comm_device(), dtype=torch.int32)
    dist.all_reduce(t)
    return (t > 0).to(local_done.device)


def autocast_forward(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Mixed precision for a module the data-parallel loop moves itself instead of handing it to
    `accelerator.prepare`: its forward runs under the accelerator's autocast and returns fp32
    outputs, as `Accelerator.prepare_model` does for a prepared one (fp32 master weights stay)."""
    if not accelerator.native_amp:
        return module
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32
    from accelerate.utils.modeling import get_mixed_precision_context_manager

    ctx = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    module.forward = MethodType(convert_outputs_to_fp32(ctx(module.forward.__func__)), module)
    return module
