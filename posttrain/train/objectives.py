"""Loss functions (pure, tensor in / tensor out) and the objective registry.

Conventions: `logp`, `old_logp`, `ref_logp` and `mask` are [B, T] over target positions (see
`train.sequences`); `mask` is 1.0 on completion tokens. Every function states its formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

if TYPE_CHECKING:
    from posttrain.config import TrainConfig
    from posttrain.train.data_sources import Batch


# ----------------------------------------------------------------------------------------------
# pure functions


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean               sum_{b,t} m*L / sum_{b,t} m                 (every token weighs the same)
    seq-mean-token-mean      1/B sum_b [ sum_t m*L / sum_t m ]           (every sequence weighs the same)
    seq-mean-token-sum-norm  1/B sum_b [ sum_t m*L ] / norm_len          (Dr. GRPO: a constant length,
                                                                          no length bias; norm_len = T)
    """
    m = mask.float()
    if mode == "token-mean":
        return (loss * m).sum() / m.sum().clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.mean()
    if mode == "seq-mean-token-sum-norm":
        return (loss * m).sum(-1).mean() / float(norm_len or loss.shape[-1])
    raise ValueError(f"unknown loss aggregation {mode!r}")


def nll_loss(logp: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Completion-only negative log-likelihood:  -agg(log pi(y_t | x, y_<t))."""
    return aggregate(-logp, mask, mode)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples y ~ pi (Schulman, 2020):

    k1 = log pi - log pi_ref                                   unbiased, high variance, can be < 0
    k2 = 1/2 (log pi - log pi_ref)^2                           biased, low variance, >= 0
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1  unbiased, low variance, >= 0
    """
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.pow(2)
    if kind == "k3":
        # clamp the exponent like verl does: a token with a huge log-ratio would overflow
        neg = (-diff).clamp(min=-20.0, max=20.0)
        return neg.exp() - neg - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped surrogate (Schulman et al., 2017), with asymmetric clip (DAPO):

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        L_t   = max( -A * rho_t,  -A * clip(rho_t, 1 - eps_low, 1 + eps_high) )

    `advantages` is [B] (one per sequence, broadcast over tokens) or [B, T].
    Returns (agg(L), fraction of completion tokens where the clipped branch was taken).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    m = mask.float()
    clipfrac = ((clipped > unclipped).float() * m).sum() / m.sum().clamp(min=1.0)
    return aggregate(loss, mask, mode), clipfrac


# ----------------------------------------------------------------------------------------------
# objectives: how the loop turns a batch into a loss


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


class Objective:
    """An objective turns policy (and optionally reference) log-probs of a batch into a loss."""

    name: ClassVar[str] = ""
    default_data: ClassVar[str] = "expert"
    needs_rewards: ClassVar[bool] = False

    def compute(self, logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                batch: "Batch", cfg: "TrainConfig") -> LossOutput:
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def deco(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


def _kl_term(logp, ref_logp, mask, cfg) -> tuple[torch.Tensor, float]:
    """The KL-to-reference loss term (0 when kl_coef is 0) and the measured k1 KL, for logging."""
    if ref_logp is None:
        return logp.new_zeros(()), float("nan")
    m = mask.float()
    measured = float(((logp.detach() - ref_logp) * m).sum() / m.sum().clamp(min=1.0))
    if cfg.kl_coef == 0.0:
        return logp.new_zeros(()), measured
    return cfg.kl_coef * aggregate(kl_penalty(logp, ref_logp, cfg.kl_estimator), mask, cfg.loss_agg), measured


@register_objective("sft")
class SFT(Objective):
    """Supervised fine-tuning: completion-only NLL, plus an optional KL-to-base anchor."""

    default_data = "expert"

    def compute(self, logp, old_logp, ref_logp, batch, cfg):
        mask = batch.packed.target_mask
        nll = nll_loss(logp, mask, cfg.loss_agg)
        kl, measured = _kl_term(logp, ref_logp, mask, cfg)
        return LossOutput(nll + kl, {"nll": float(nll.detach()), "kl_ref": measured})


@register_objective("grpo")
class GRPO(Objective):
    """GRPO: group-normalised outcome advantages in the clipped surrogate, optional KL loss term."""

    default_data = "on_policy"
    needs_rewards = True

    def compute(self, logp, old_logp, ref_logp, batch, cfg):
        from posttrain.train.advantages import grpo_advantages

        mask = batch.packed.target_mask
        adv = grpo_advantages(batch.rewards, batch.group_size, cfg.adv_norm_std, cfg.adv_eps).to(logp.device)
        pg, clipfrac = clipped_policy_loss(logp, old_logp, adv, mask, cfg.clip_eps_low, cfg.clip_eps_high, cfg.loss_agg)
        kl, measured = _kl_term(logp, ref_logp, mask, cfg)
        ratio = torch.exp(logp.detach() - old_logp)
        m = mask.float()
        return LossOutput(
            pg + kl,
            {
                "pg_loss": float(pg.detach()),
                "clipfrac": float(clipfrac),
                "ratio_mean": float((ratio * m).sum() / m.sum().clamp(min=1.0)),
                "kl_ref": measured,
                "adv_abs_mean": float(adv.abs().mean()),
            },
        )
