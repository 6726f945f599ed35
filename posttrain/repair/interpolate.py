"""Weight interpolation (WiSE-FT) and task arithmetic, tensor by tensor.

WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot models" (arXiv:2109.01903).
Task arithmetic: Ilharco et al., "Editing Models with Task Arithmetic" (arXiv:2212.04089).
"""

from __future__ import annotations

import torch

from posttrain.errors import UserError
from pydantic import Field

from posttrain.repair.base import FloatList, Fraction, Params, Repair, TensorInfo, register_repair


def interpolate_tensor(w_base: torch.Tensor, w_target: torch.Tensor, alpha: float) -> torch.Tensor:
    """W = (1 − α)·W_base + α·W_target, computed in float64 and cast to W_target's dtype.

    The endpoints are exact copies: α = 0 gives W_base and α = 1 gives W_target (cast to the
    target's dtype), so no rounding and no 0·inf from a non-finite weight of the unused side.
    """
    if alpha == 0.0:
        return w_base.to(w_target.dtype, copy=True)
    if alpha == 1.0:
        return w_target.clone()
    out = (1.0 - alpha) * w_base.to(torch.float64) + alpha * w_target.to(torch.float64)
    return out.to(w_target.dtype)


def task_arithmetic_tensor(w_base: torch.Tensor, w_targets: list[torch.Tensor], lambdas: list[float]) -> torch.Tensor:
    """W = W_base + Σ_i λ_i (W_i − W_base), computed in float64 and cast to W_targets[0]'s dtype."""
    if len(w_targets) != len(lambdas) or not w_targets:
        raise ValueError("task arithmetic needs one lambda per target")
    b = w_base.to(torch.float64)
    out = b.clone()
    for w, lam in zip(w_targets, lambdas):
        if lam != 0.0:
            out += lam * (w.to(torch.float64) - b)
    return out.to(w_targets[0].dtype)


@register_repair("interpolate")
class Interpolate(Repair):
    """WiSE-FT interpolation of every selected floating-point tensor, 1-D norms included (averaging
    a norm gain is as meaningful as averaging a matrix, and leaving norms at the target would make
    alpha = 0 not the base). Integer/bool buffers, if any, are the target's."""

    axis = "alpha"
    help = "WiSE-FT weight interpolation between base and target (every floating-point tensor)."
    class Params(Params):
        alpha: Fraction = Field(description="Weight of the target: W = (1 - alpha) W_base + alpha W_target, in [0, 1].")

    def eligible(self, t: TensorInfo) -> bool:
        return t.is_float

    def apply(self, name: str, base: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        return interpolate_tensor(base, targets[0], self.params["alpha"])


@register_repair("task_arithmetic")
class TaskArithmetic(Repair):
    """Task arithmetic over several fine-tuned targets of one base; `lambdas` has one scale per
    target, or a single scale used for all. The output's config, tokenizer and sharding are the
    first target's. λ may be any finite number (negative = task negation, > 1 = extrapolation)."""

    axis = "lambdas"
    help = "Task arithmetic: W = W_base + sum_i lambda_i (W_i - W_base); config and tokenizer of the first target."
    multi_target = True
    class Params(Params):
        lambdas: FloatList = Field(description="Scale of each target's task vector, one per --target in order, or one "
                                               "for all (repeatable; any finite number).",
                                   json_schema_extra={"cli_name": "--lambda"})

    def eligible(self, t: TensorInfo) -> bool:
        return t.is_float

    def check_targets(self, n: int) -> None:
        super().check_targets(n)
        self.lambdas_for(n)

    def lambdas_for(self, n_targets: int) -> list[float]:
        lams = self.params["lambdas"]
        if len(lams) == 1:
            return lams * n_targets
        if len(lams) != n_targets:
            raise UserError(f"task_arithmetic: {len(lams)} lambdas for {n_targets} targets "
                            "(give one per target, or a single one for all)")
        return lams

    def apply(self, name: str, base: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        return task_arithmetic_tensor(base, targets, self.lambdas_for(len(targets)))
