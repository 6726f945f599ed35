"""Advantage estimators: pure tensor functions, each tested against hand-computed values, and the
registry (`ESTIMATORS`) that clipped policy-gradient objectives choose from by name.

Rewards arrive in prompt-major order: rows ``g*G .. g*G+G-1`` are the G samples of prompt g.
A new estimator is one function::

    @register_estimator("my_baseline", needs_groups=True)
    def my_baseline(rewards, group_size, *, my_scale: float = 1.0):   # keyword-only args = config knobs
        r = rewards.float().view(-1, group_size)
        return (my_scale * (r - r.median(dim=1, keepdim=True).values)).reshape(-1)

and a method uses it with ``{objective: grpo, estimator: my_baseline, my_scale: 0.5}``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Callable, get_type_hints

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model


def grpo_advantages(rewards: torch.Tensor, group_size: int, norm_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages of GRPO (Shao et al., 2024, DeepSeekMath):

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     if norm_std
        A_i =  r_i - mean_g(r)                          otherwise (Dr. GRPO, Liu et al., 2025)

    std is the unbiased sample standard deviation within the group (torch.std default, as in the
    reference implementations). A group whose rewards are all equal gets advantage 0.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if norm_std and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024):

        A_i = r_i - (1 / (G - 1)) * sum_{j != i} r_j  =  G / (G - 1) * (r_i - mean_g(r))
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    r = rewards.float().view(-1, group_size)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over token positions.

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1} * m_{t+1}
        R_t     = A_t + V_t                      (the value targets)

    `rewards`, `values`, `mask` are [B, T]; positions with mask 0 get advantage 0 and do not
    propagate. V beyond the last valid token is 0 (the episode ends there).
    """
    B, T = rewards.shape
    adv = torch.zeros_like(values, dtype=torch.float32)
    last = torch.zeros(B, dtype=torch.float32, device=values.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=values.device)
    next_mask = torch.zeros(B, dtype=torch.float32, device=values.device)
    m = mask.float()
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last = delta + gamma * lam * last * next_mask
        adv[:, t] = last * m[:, t]
        next_value, next_mask = values[:, t], m[:, t]
        last = last * m[:, t]
    return adv, (adv + values) * m


def ppo_token_rewards(rewards: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                      kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards of PPO from one outcome reward per sequence (the RLHF shaping of Ziegler et
    al., 2019, "Fine-Tuning Language Models from Human Preferences", and Ouyang et al., 2022):

        r_t = R * 1[t = last completion token]  -  kl_coef * k_t * m_t

    `rewards` is [B] (the verifier's), `mask` [B, T] marks the completion tokens, `kl` [B, T] is the
    per-token KL estimate k_t (None, or kl_coef 0: no KL shaping). A row without completion tokens
    gets no outcome reward.
    """
    token_r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # last completion token
    token_r[last] = rewards.to(token_r.device)[last.any(-1)]
    if kl is not None and kl_coef:
        token_r = token_r - kl_coef * kl * mask
    return token_r


# ----------------------------------------------------------------------------------------------
# the estimator registry: which advantage a clipped policy-gradient objective optimises


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator: a pure function with its traits and typed parameters.

    level "sequence": fn(rewards [N], group_size, **params) -> advantages [N] (outcome rewards,
    prompt-major groups); level "token": fn(token_rewards [B, T], values [B, T], mask [B, T],
    **params) -> (advantages [B, T], returns [B, T]) (needs a critic). `params` is a pydantic model
    built from the function's keyword-only arguments: their names are the config knobs.
    """

    name: str
    fn: Callable[..., Any]
    level: str
    needs_groups: bool
    params: type[BaseModel]

    @property
    def needs_critic(self) -> bool:
        return self.level == "token"


ESTIMATORS: dict[str, Estimator] = {}


def params_model(name: str, fn: Callable[..., Any]) -> type[BaseModel]:
    """A strict pydantic model of `fn`'s keyword-only arguments (annotations and defaults kept)."""
    hints = get_type_hints(fn, include_extras=True)
    fields = {p.name: (hints.get(p.name, Any), p.default) for p in inspect.signature(fn).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return create_model(f"{name}_params", __config__=ConfigDict(extra="forbid"), **fields)


def register_estimator(name: str, *, level: str = "sequence", needs_groups: bool = False):
    """Decorator: make `fn` the advantage estimator `name` (see `Estimator`)."""
    if level not in ("sequence", "token"):
        raise ValueError(f"estimator {name!r}: level must be 'sequence' or 'token', not {level!r}")

    def deco(fn):
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} registered twice")
        ESTIMATORS[name] = Estimator(name, fn, level, needs_groups, params_model(name, fn))
        return fn

    return deco


@register_estimator("grpo", needs_groups=True)
def group_normalised(rewards: torch.Tensor, group_size: int, *, adv_norm_std: bool = True,
                     adv_eps: Annotated[float, Field(gt=0)] = 1e-6) -> torch.Tensor:
    """GRPO's group-normalised advantage (`grpo_advantages`); `adv_norm_std: false` is Dr. GRPO's."""
    return grpo_advantages(rewards, group_size, adv_norm_std, adv_eps)


@register_estimator("dr_grpo", needs_groups=True)
def group_centred(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al., 2025): the group-mean baseline without the std division."""
    return grpo_advantages(rewards, group_size, norm_std=False)


@register_estimator("rloo", needs_groups=True)
def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's leave-one-out baseline (`rloo_advantages`)."""
    return rloo_advantages(rewards, group_size)


@register_estimator("gae", level="token")
def generalised(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *,
                gamma: Annotated[float, Field(ge=0, le=1)] = 1.0,
                lam: Annotated[float, Field(ge=0, le=1)] = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) over token positions with a learned critic (`gae`)."""
    return gae(token_rewards, values, mask, gamma, lam)
