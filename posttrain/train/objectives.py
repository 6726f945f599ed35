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


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, mode: str = "token-mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of PPO (as in the OpenAI baselines / verl implementations):

        V_clip = V_old + clip(V - V_old, -c, c)
        L_t    = 1/2 max( (V - R)^2, (V_clip - R)^2 )        (1/2 (V - R)^2 when clip is None)

    Returns (agg(L), fraction of tokens where the clipped branch was larger).
    """
    unclipped = (values - returns).pow(2)
    if clip is None:
        return 0.5 * aggregate(unclipped, mask, mode), values.new_zeros(())
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns).pow(2)
    m = mask.float()
    frac = ((clipped > unclipped).float() * m).sum() / m.sum().clamp(min=1.0)
    return 0.5 * aggregate(torch.maximum(unclipped, clipped), mask, mode), frac


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked entries; masked-out entries become 0."""
    m = mask.float()
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = ((x - mean).pow(2) * m).sum() / n
    return (x - mean) / (var.sqrt() + eps) * m


# ----------------------------------------------------------------------------------------------
# objectives: how the loop turns a batch into a loss


@dataclass
class PolicyOutputs:
    """What one forward pass of the policy gives an objective, all [B, T] over target positions."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


class Objective:
    """Turns policy outputs on a batch into a loss.

    `prepare` runs once per batch, before any update, with the behaviour policy's outputs (`old`)
    and the reference log-probs: advantages and returns are computed there and kept on the batch.
    `compute` then runs for each of the `num_iterations` x `minibatches` updates.
    """

    name: ClassVar[str] = ""
    default_data: ClassVar[str] = "expert"
    needs_rewards: ClassVar[bool] = False
    needs_values: ClassVar[bool] = False
    needs_entropy: ClassVar[bool] = False

    def prepare(self, batch: "Batch", old: PolicyOutputs, ref_logp: torch.Tensor | None, cfg: "TrainConfig") -> dict[str, float]:
        return {}

    def grad_groups(self, batch: "Batch", cfg: "TrainConfig") -> list[int] | None:
        """The prompt groups whose share of the loss can have a nonzero gradient, when every other
        group's is exactly zero (the update then skips their backward); None: all groups."""
        return None

    def compute(self, new: PolicyOutputs, old: PolicyOutputs, ref_logp: torch.Tensor | None,
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


def measured_kl(logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor) -> float:
    """Mean k1 estimate of KL(pi || pi_ref) per token on the batch: always logged, whatever kl_coef."""
    if ref_logp is None:
        return float("nan")
    m = mask.float()
    return float(((logp.detach() - ref_logp) * m).sum() / m.sum().clamp(min=1.0))


def kl_loss_term(logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, cfg) -> torch.Tensor:
    """kl_coef * agg(k(log pi, log pi_ref)) when the KL is a loss term; 0 otherwise."""
    if ref_logp is None or cfg.kl_coef == 0.0 or cfg.kl_mode != "loss":
        return logp.new_zeros(())
    return cfg.kl_coef * aggregate(kl_penalty(logp, ref_logp, cfg.kl_estimator), mask, cfg.loss_agg)


def sequence_rewards(batch: "Batch", old: PolicyOutputs, ref_logp: torch.Tensor | None, cfg) -> torch.Tensor:
    """Verifier rewards, minus kl_coef * sum_t k(y_t) per sequence when the KL goes in the reward."""
    r = batch.rewards.to(old.logp.device)
    if ref_logp is not None and cfg.kl_coef and cfg.kl_mode == "reward":
        m = batch.packed.target_mask
        r = r - cfg.kl_coef * (kl_penalty(old.logp, ref_logp, cfg.kl_estimator) * m).sum(-1)
    return r


@register_objective("sft")
class SFT(Objective):
    """Supervised fine-tuning: completion-only NLL, plus an optional KL-to-base anchor (loss term)."""

    default_data = "expert"

    def compute(self, new, old, ref_logp, batch, cfg):
        mask = batch.packed.target_mask
        nll = nll_loss(new.logp, mask, cfg.loss_agg)
        kl = kl_loss_term(new.logp, ref_logp, mask, cfg)
        return LossOutput(nll + kl, {"nll": float(nll.detach()), "kl_ref": measured_kl(new.logp, ref_logp, mask)})


def _zero_groups(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: the prompt groups whose sequence advantages are all exactly 0."""
    return (advantages.view(-1, group_size) == 0).all(-1)


class _ClippedPG(Objective):
    """Shared part of the critic-free policy-gradient objectives (GRPO, RLOO)."""

    default_data = "on_policy"
    needs_rewards = True

    def advantages(self, rewards: torch.Tensor, batch: "Batch", cfg) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, batch, old, ref_logp, cfg):
        batch.advantages = self.advantages(sequence_rewards(batch, old, ref_logp, cfg), batch, cfg)
        zero = _zero_groups(batch.advantages, batch.group_size)
        return {"adv_abs_mean": float(batch.advantages.abs().mean()), "groups_zero_adv": float(zero.float().mean())}

    def grad_groups(self, batch, cfg):
        """Without a KL term the loss is the clipped surrogate alone, and a group whose advantages
        are all exactly 0 (equal rewards, e.g. all wrong) adds -0 * rho to it: zero gradient."""
        if cfg.kl_coef != 0 or batch.rewards is None or batch.packed.shared is None:
            return None
        live = ~_zero_groups(self.advantages(batch.rewards, batch, cfg), batch.group_size)
        if bool(live.all()) or not bool(live.any()):
            return None
        return live.nonzero().squeeze(-1).tolist()

    def compute(self, new, old, ref_logp, batch, cfg):
        mask = batch.packed.target_mask
        pg, clipfrac = clipped_policy_loss(new.logp, old.logp, batch.advantages, mask, cfg.clip_eps_low,
                                           cfg.clip_eps_high, cfg.loss_agg)
        kl = kl_loss_term(new.logp, ref_logp, mask, cfg)
        ratio = torch.exp(new.logp.detach() - old.logp)
        m = mask.float()
        return LossOutput(pg + kl, {
            "pg_loss": float(pg.detach()),
            "clipfrac": float(clipfrac),
            "ratio_mean": float((ratio * m).sum() / m.sum().clamp(min=1.0)),
            "kl_ref": measured_kl(new.logp, ref_logp, mask),
        })


@register_objective("grpo")
class GRPO(_ClippedPG):
    """GRPO: group-normalised outcome advantages in the clipped surrogate (std switchable: Dr. GRPO)."""

    def advantages(self, rewards, batch, cfg):
        from posttrain.train.advantages import grpo_advantages

        return grpo_advantages(rewards, batch.group_size, cfg.adv_norm_std, cfg.adv_eps)


@register_objective("rloo")
class RLOO(_ClippedPG):
    """REINFORCE with a leave-one-out baseline; with num_iterations=1 the clip is inactive and this
    is plain REINFORCE on A_i = r_i - mean_{j != i} r_j."""

    def advantages(self, rewards, batch, cfg):
        from posttrain.train.advantages import rloo_advantages

        return rloo_advantages(rewards, batch.group_size)


@register_objective("ppo")
class PPO(Objective):
    """PPO with a learned critic (a value head on the policy's last hidden state) and GAE.

    Token rewards: the verifier's reward on the last completion token, minus kl_coef * k(y_t) on
    every token when kl_mode is "reward" (the classic RLHF shaping). Advantages are whitened over
    the batch; the loss is clipped surrogate + vf_coef * clipped value loss - entropy_coef * H.
    """

    default_data = "on_policy"
    needs_rewards = True
    needs_values = True
    needs_entropy = True

    def prepare(self, batch, old, ref_logp, cfg):
        from posttrain.train.advantages import gae, ppo_token_rewards

        mask = batch.packed.target_mask
        kl = None
        if ref_logp is not None and cfg.kl_coef and cfg.kl_mode == "reward":
            kl = kl_penalty(old.logp, ref_logp, cfg.kl_estimator)
        token_r = ppo_token_rewards(batch.rewards, mask, kl, cfg.kl_coef)
        adv, returns = gae(token_r, old.values, mask, cfg.gamma, cfg.lam)
        batch.advantages = masked_whiten(adv, mask)
        batch.returns = returns
        m = mask.float()
        return {"value_mean": float((old.values * m).sum() / m.sum().clamp(min=1.0)),
                "return_mean": float((returns * m).sum() / m.sum().clamp(min=1.0))}

    def compute(self, new, old, ref_logp, batch, cfg):
        mask = batch.packed.target_mask
        pg, clipfrac = clipped_policy_loss(new.logp, old.logp, batch.advantages, mask, cfg.clip_eps_low,
                                           cfg.clip_eps_high, cfg.loss_agg)
        vl, vclip = value_loss(new.values, old.values, batch.returns, mask, cfg.value_clip, cfg.loss_agg)
        ent = aggregate(new.entropy, mask, cfg.loss_agg)
        kl = kl_loss_term(new.logp, ref_logp, mask, cfg)
        loss = pg + cfg.vf_coef * vl - cfg.entropy_coef * ent + kl
        return LossOutput(loss, {
            "pg_loss": float(pg.detach()), "value_loss": float(vl.detach()), "entropy": float(ent.detach()),
            "clipfrac": float(clipfrac), "value_clipfrac": float(vclip),
            "kl_ref": measured_kl(new.logp, ref_logp, mask),
        })
