"""Advantage estimators: pure tensor functions, each tested against hand-computed values.

Rewards arrive in prompt-major order: rows ``g*G .. g*G+G-1`` are the G samples of prompt g.
"""

from __future__ import annotations

import torch


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
