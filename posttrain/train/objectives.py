"""Loss functions (pure, tensor in / tensor out) and the objective registry.

Conventions: `logp`, `old_logp`, `ref_logp` and `mask` are [B, T] over target positions (see
`train.sequences`); `mask` is 1.0 on completion tokens. Every function states its formula.

An objective is one registered class that declares what it needs (`Traits`) and the knobs it
reads (`Params`, a pydantic model whose field names are config keys)::

    @register_objective("my_pg")
    class MyPG(Objective):
        traits = Traits(rl=True, default_data="on_policy")
        estimator_level = "sequence"          # it optimises a registered advantage estimator's output
        default_estimator = "grpo"

        class Params(BaseModel):
            my_temperature: float = 1.0

        def prepare(self, batch, old, ref_logp, cfg):   # once per batch: advantages, no mutation
            return self.sequence_targets(batch, old, ref_logp, cfg), {}

        def compute(self, new, old, ref_logp, batch, targets, cfg):
            adv = targets.advantages.unsqueeze(-1) * cfg.objective_params.my_temperature
            return LossOutput(masked_mean(-adv * new.logp, batch.packed.target_mask), {})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from posttrain.train.distributed import global_sum, reducing_over_ranks

if TYPE_CHECKING:
    from posttrain.config import TrainConfig
    from posttrain.train.data_sources import Batch


# ----------------------------------------------------------------------------------------------
# pure functions


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * m) / max(sum(m), 1): the mean over the masked entries (0 when there are none).
    Under `train.distributed.reducing()` both sums run over every rank's rows."""
    m = mask.float()
    return global_sum((x * m).sum()) / global_sum(m.sum()).clamp(min=1.0)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar (B = the rows of this (mini)batch).

    token-mean               sum_{b,t} m*L / sum_{b,t} m                 (every token weighs the same)
    seq-mean-token-mean      1/B sum_b [ sum_t m*L / sum_t m ]           (every sequence weighs the same)
    seq-mean-token-sum-norm  sum_{b,t} m*L / (B * norm_len)              (Dr. GRPO, Liu et al., 2025)

    seq-mean-token-sum-norm divides by a constant, `norm_len` = the generation budget
    (max_new_tokens), never by this batch's width: TRL `loss_type="dr_grpo"`,
    `(per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)`
    (huggingface/trl f2cd5771, trl/trainer/grpo_trainer.py). A width-dependent divisor would
    change the step size with every batch's padding, which Dr. GRPO exists to avoid. verl's
    `agg_loss` (volcengine/verl b178a3cd, core_algos.py) sums rather than averages over the
    sequences (a factor of B) and uses the padded response width, which its rollout pads to the
    constant max response length.
    """
    m = mask.float()
    if mode == "token-mean":
        return masked_mean(loss, m)
    if mode == "seq-mean-token-mean":
        per_seq = (loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        if not reducing_over_ranks():
            return per_seq.mean()
        return global_sum(per_seq.sum()) / global_sum(per_seq.new_tensor(float(per_seq.shape[0])))
    if mode == "seq-mean-token-sum-norm":
        if norm_len is None or norm_len < 1:
            raise ValueError("seq-mean-token-sum-norm needs a constant norm_len >= 1 (the max_new_tokens budget)")
        if not reducing_over_ranks():
            return (loss * m).sum() / (loss.shape[0] * float(norm_len))
        rows = global_sum(loss.new_tensor(float(loss.shape[0])))
        return global_sum((loss * m).sum()) / (rows * float(norm_len))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def method_aggregate(loss: torch.Tensor, mask: torch.Tensor, cfg) -> torch.Tensor:
    """`aggregate` with a method's `loss_agg`, its Dr. GRPO constant being the method's max_new_tokens."""
    return aggregate(loss, mask, cfg.loss_agg, cfg.max_new_tokens)


def nll_loss(logp: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_len: int | None = None) -> torch.Tensor:
    """Completion-only negative log-likelihood:  -agg(log pi(y_t | x, y_<t))."""
    return aggregate(-logp, mask, mode, norm_len)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimators of KL(pi || pi_ref) from samples y ~ pi (Schulman, 2020):

    k1 = log pi - log pi_ref                                   unbiased, high variance, can be < 0
    k2 = 1/2 (log pi - log pi_ref)^2                           biased, low variance, >= 0
    k3 = clamp(exp(x) - x - 1, -10, 10),  x = clamp(log pi_ref - log pi, -20, 20)
                                                               unbiased (unclamped), low variance, >= 0

    The two clamps of k3 are verl's `low_var_kl` (volcengine/verl b178a3cd,
    verl/trainer/ppo/core_algos.py `kl_penalty_forward`): the exponent's keeps exp finite, the
    result's bounds one token's penalty at 10 (reached when log pi_ref - log pi > ~2.61 or
    log pi - log pi_ref > ~11) and gives such a token zero gradient. k1 and k2 are not clamped
    (as in verl; OpenRLHF clamps every estimator to [-10, 10]).
    """
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.pow(2)
    if kind == "k3":
        neg = (-diff).clamp(min=-20.0, max=20.0)
        return (neg.exp() - neg - 1.0).clamp(min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r}")


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """rho_t = exp(clamp(log pi(y_t) - log pi_old(y_t), -20, 20)).

    The clamp is verl's (`negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)`
    in `compute_policy_loss_vanilla`, volcengine/verl b178a3cd) and OpenRLHF's `PolicyLoss`: one
    token whose probability moved by e^20 cannot overflow the loss; beyond it the gradient is 0.
    """
    return torch.exp((logp - old_logp).clamp(min=-20.0, max=20.0))


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    mode: str = "token-mean",
    clip_ratio_c: float | None = 3.0,
    norm_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped surrogate (Schulman et al., 2017), with asymmetric clip (DAPO) and dual-clip
    (Ye et al., 2020), as verl's `compute_policy_loss_vanilla` (volcengine/verl b178a3cd,
    verl/trainer/ppo/core_algos.py):

        rho_t = exp(clamp(log pi(y_t) - log pi_old(y_t), -20, 20))          (`policy_ratio`)
        L1_t  = max( -A * rho_t,  -A * clip(rho_t, 1 - eps_low, 1 + eps_high) )
        L_t   = min( L1_t, -clip_ratio_c * A )    if A < 0 and clip_ratio_c is not None
        L_t   = L1_t                              otherwise

    The dual clip caps a negative-advantage token's loss at clip_ratio_c * |A| (verl's default
    clip_ratio_c is 3.0 and must exceed 1), so a token whose ratio exploded cannot dominate.
    `advantages` is [B] (one per sequence, broadcast over tokens) or [B, T]. Returns (agg(L),
    fraction of completion tokens where the clipped branch was taken, fraction where the dual clip
    was: verl's pg_clipfrac and pg_clipfrac_lower).
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must exceed 1, not {clip_ratio_c}")
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = policy_ratio(logp, old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    if clip_ratio_c is None:
        return aggregate(loss, mask, mode, norm_len), clipfrac, clipfrac.new_zeros(())
    cap = -clip_ratio_c * adv
    negative = (adv < 0).expand_as(loss)
    lower = masked_mean(((loss > cap) & negative).float(), mask)
    loss = torch.where(negative, torch.minimum(loss, cap), loss)
    return aggregate(loss, mask, mode, norm_len), clipfrac, lower


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, mode: str = "token-mean",
               norm_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of PPO (as in the OpenAI baselines / verl implementations):

        V_clip = V_old + clip(V - V_old, -c, c)
        L_t    = 1/2 max( (V - R)^2, (V_clip - R)^2 )        (1/2 (V - R)^2 when clip is None)

    Returns (agg(L), fraction of tokens where the clipped branch was larger).
    """
    unclipped = (values - returns).pow(2)
    if clip is None:
        return 0.5 * aggregate(unclipped, mask, mode, norm_len), values.new_zeros(())
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns).pow(2)
    frac = masked_mean((clipped > unclipped).float(), mask)
    return 0.5 * aggregate(torch.maximum(unclipped, clipped), mask, mode, norm_len), frac


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten over the masked entries; masked-out entries become 0:

        mu = sum m*x / sum m,   var = sum m*(x - mu)^2 / sum m   (biased),   (x - mu) / (sqrt(var) + eps)

    The variance is the biased one, as OpenRLHF's (`experience_maker.py`: mean of squared
    deviations, then `var.clamp(min=1e-8).rsqrt()`; OpenRLHF/OpenRLHF 3c3be623). verl's
    `masked_whiten` (volcengine/verl b178a3cd, verl/utils/torch_functional.py) uses the unbiased
    variance, `(x - mu) * rsqrt(var * N/(N-1) + 1e-8)`: on N whitened tokens ours is larger by
    sqrt(N/(N-1)) (1.118 at N=5, about 1.001 at the >= 500 tokens of a PPO step). Kept biased:
    the difference is a near-constant factor on the advantages, which Adam's normalisation
    largely absorbs, and N=1 needs no special case (verl raises).
    """
    m = mask.float()
    n = global_sum(m.sum()).clamp(min=1.0)
    mean = global_sum((x * m).sum()) / n
    var = global_sum(((x - mean).pow(2) * m).sum()) / n
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
class Targets:
    """What an objective derives from a batch before any update: advantages ([B] per sequence or
    [B, T] per token) and value targets ([B, T]); None where the objective has none."""

    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, idx: torch.Tensor, width: int) -> "Targets":
        """The rows `idx`, cut to `width - 1` target positions (a minibatch of `Batch.select`)."""
        def cut(x):
            if x is None:
                return None
            x = x[idx.to(x.device)]
            return x[:, : width - 1] if x.dim() == 2 else x
        return Targets(cut(self.advantages), cut(self.returns))


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


@dataclass(frozen=True)
class Traits:
    """What an objective needs. `rl`: it learns from verifier rewards (so it needs on-policy data,
    may put the KL in the reward, and counts as "the RL method" in the findings); `needs_groups`:
    several samples per prompt; `needs_critic`: a value model; `needs_entropy`: token entropies;
    `default_data`: the data source when a method names none."""

    rl: bool = False
    needs_groups: bool = False
    needs_critic: bool = False
    needs_entropy: bool = False
    default_data: str = "expert"


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objective:
    """Turns policy outputs on a batch into a loss.

    `prepare` runs once per batch, before any update, with the behaviour policy's outputs (`old`)
    and the reference log-probs, and returns the `Targets` (advantages, returns) and metrics; it
    does not modify the batch. `compute` then runs for each of the `num_iterations` x `minibatches`
    updates. `estimator_level` is None for objectives without advantages, else the level
    ("sequence" or "token") of the registered estimators it accepts.
    """

    name: ClassVar[str] = ""
    traits: ClassVar[Traits] = Traits()
    Params: ClassVar[type[BaseModel]] = NoParams
    estimator_level: ClassVar[str | None] = None
    default_estimator: ClassVar[str | None] = None

    def prepare(self, batch: "Batch", old: PolicyOutputs, ref_logp: torch.Tensor | None,
                cfg: "TrainConfig") -> tuple[Targets, dict[str, float]]:
        return Targets(), {}

    def logit_temperature(self, cfg: "TrainConfig") -> float:
        """The temperature dividing the logits of the policy's, the behaviour policy's and the
        reference's log-probs (and entropies) in this objective's loss.

        Objectives that learn from rewards use the sampling temperature, the distribution their
        samples came from (verl dp_actor `logits.div_(temperature)` with the rollout temperature for
        actor, old and ref log-probs, volcengine/verl b178a3cd; TRL `_get_per_token_logps_and_entropies`,
        huggingface/trl f2cd5771). The others (SFT, Expert Iteration, Self-SFT) fit the model's own
        distribution, temperature 1, whatever temperature sampled their data (verl's SFT trainers,
        Retaining-by-Doing's CrossEntropyLoss).
        """
        return cfg.temperature if self.traits.rl else 1.0

    def grad_groups(self, batch: "Batch", cfg: "TrainConfig") -> list[int] | None:
        """The prompt groups whose share of the loss can have a nonzero gradient, when every other
        group's is exactly zero (the update then skips their backward); None: all groups."""
        return None

    def compute(self, new: PolicyOutputs, old: PolicyOutputs, ref_logp: torch.Tensor | None,
                batch: "Batch", targets: Targets, cfg: "TrainConfig") -> LossOutput:
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
    return float(masked_mean(logp.detach() - ref_logp, mask))


def kl_loss_term(logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor, cfg) -> torch.Tensor:
    """kl_coef * agg(k(log pi, log pi_ref)) when the KL is a loss term; 0 otherwise."""
    if ref_logp is None or cfg.kl_coef == 0.0 or cfg.kl_mode != "loss":
        return logp.new_zeros(())
    return cfg.kl_coef * method_aggregate(kl_penalty(logp, ref_logp, cfg.kl_estimator), mask, cfg)


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

    traits = Traits(default_data="expert")

    def compute(self, new, old, ref_logp, batch, targets, cfg):
        mask = batch.packed.target_mask
        nll = nll_loss(new.logp, mask, cfg.loss_agg, cfg.max_new_tokens)
        kl = kl_loss_term(new.logp, ref_logp, mask, cfg)
        return LossOutput(nll + kl, {"nll": float(nll.detach()), "kl_ref": measured_kl(new.logp, ref_logp, mask)})


def _zero_groups(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n_groups] bool: the prompt groups whose sequence advantages are all exactly 0."""
    return (advantages.view(-1, group_size) == 0).all(-1)


class ClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_eps_low: Annotated[float, Field(ge=0)] = 0.2
    clip_eps_high: Annotated[float, Field(ge=0)] = 0.2
    # dual clip of negative-advantage tokens (verl's clip_ratio_c, default 3.0); null: off (TRL, OpenRLHF's default)
    clip_ratio_c: Annotated[float, Field(gt=1)] | None = 3.0


class ClippedPG(Objective):
    """The clipped policy-gradient surrogate on outcome advantages from a registered sequence-level
    estimator (`posttrain.train.advantages.ESTIMATORS`): GRPO and RLOO are this objective with the
    "grpo" and "rloo" estimators (`estimator:` picks another)."""

    traits = Traits(rl=True, default_data="on_policy")
    Params = ClipParams
    estimator_level = "sequence"

    def advantages(self, rewards: torch.Tensor, batch: "Batch", cfg) -> torch.Tensor:
        est = cfg.estimator_spec
        return est.fn(rewards, batch.group_size, **cfg.estimator_params.model_dump())

    def prepare(self, batch, old, ref_logp, cfg):
        adv = self.advantages(sequence_rewards(batch, old, ref_logp, cfg), batch, cfg)
        metrics = {"adv_abs_mean": float(adv.abs().mean())}
        if cfg.estimator_spec.needs_groups:
            metrics["groups_zero_adv"] = float(_zero_groups(adv, batch.group_size).float().mean())
        return Targets(advantages=adv), metrics

    def grad_groups(self, batch, cfg):
        """Without a KL term the loss is the clipped surrogate alone, and a group whose advantages
        are all exactly 0 (equal rewards, e.g. all wrong) adds -0 * rho to it: zero gradient."""
        if cfg.kl_coef != 0 or batch.rewards is None or batch.packed.shared is None:
            return None
        live = ~_zero_groups(self.advantages(batch.rewards, batch, cfg), batch.group_size)
        if bool(live.all()) or not bool(live.any()):
            return None
        return live.nonzero().squeeze(-1).tolist()

    def compute(self, new, old, ref_logp, batch, targets, cfg):
        mask = batch.packed.target_mask
        p = cfg.objective_params
        pg, clipfrac, dualfrac = clipped_policy_loss(new.logp, old.logp, targets.advantages, mask, p.clip_eps_low,
                                                     p.clip_eps_high, cfg.loss_agg, p.clip_ratio_c, cfg.max_new_tokens)
        kl = kl_loss_term(new.logp, ref_logp, mask, cfg)
        ratio = policy_ratio(new.logp.detach(), old.logp)
        return LossOutput(pg + kl, {
            "pg_loss": float(pg.detach()),
            "clipfrac": float(clipfrac),
            "dualclip_frac": float(dualfrac),
            "ratio_mean": float(masked_mean(ratio, mask)),
            "kl_ref": measured_kl(new.logp, ref_logp, mask),
        })


@register_objective("grpo")
class GRPO(ClippedPG):
    """GRPO: the clipped surrogate on group-normalised advantages (Shao et al., 2024)."""

    default_estimator = "grpo"


@register_objective("rloo")
class RLOO(ClippedPG):
    """REINFORCE with a leave-one-out baseline; with num_iterations=1 the clip is inactive and this
    is plain REINFORCE on A_i = r_i - mean_{j != i} r_j."""

    default_estimator = "rloo"


class PPOParams(ClipParams):
    # the critic: its own model, a copy of the init model's trunk plus a value head with its own
    # optimizer and gradient clipping (verl, OpenRLHF), or a value head on the policy's trunk
    # (RL_Heals_SFT), whose value-loss gradient then also moves the policy's weights
    critic: Literal["separate", "shared"] = "separate"
    # the critic's learning rate (the value head's alone when shared); None: the method's lr
    critic_lr: Annotated[float, Field(gt=0)] | None = None
    # weight of the value loss in the summed loss; None: 1.0 for a separate critic (its own loss,
    # unscaled, as in verl and OpenRLHF), 0.1 on a shared trunk (where it competes with the policy)
    vf_coef: Annotated[float, Field(ge=0)] | None = None
    value_clip: Annotated[float, Field(gt=0)] | None = 0.2
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0

    @property
    def value_weight(self) -> float:
        if self.vf_coef is not None:
            return self.vf_coef
        return 1.0 if self.critic == "separate" else 0.1


@register_objective("ppo")
class PPO(Objective):
    """PPO with a learned critic and a token-level estimator (GAE by default).

    The critic (`critic` knob) is by default a separate model: a copy of the init model's trunk
    plus a value head, trained by its own optimizer (`critic_lr`), as in verl and OpenRLHF; its
    weights never enter the policy's checkpoint. `critic: shared` puts the value head on the
    policy's last hidden state instead. Token rewards: `ppo_token_rewards` (the verifier's reward
    on the last completion token, minus kl_coef * k(y_t) on every token when kl_mode is "reward",
    the classic RLHF shaping). Advantages are whitened over the batch; the loss is clipped
    surrogate + vf_coef * clipped value loss - entropy_coef * H (the policy's and the critic's
    parameters are disjoint when separate, so one backward gives each its own loss's gradient).
    """

    traits = Traits(rl=True, needs_critic=True, needs_entropy=True, default_data="on_policy")
    Params = PPOParams
    estimator_level = "token"
    default_estimator = "gae"

    def prepare(self, batch, old, ref_logp, cfg):
        from posttrain.train.advantages import ppo_token_rewards

        mask = batch.packed.target_mask
        kl = kl_penalty(old.logp, ref_logp, cfg.kl_estimator) if ref_logp is not None and cfg.kl_mode == "reward" else None
        token_r = ppo_token_rewards(batch.rewards, mask, kl, cfg.kl_coef)
        adv, returns = cfg.estimator_spec.fn(token_r, old.values, mask, **cfg.estimator_params.model_dump())
        return Targets(masked_whiten(adv, mask), returns), {
            "value_mean": float(masked_mean(old.values, mask)), "return_mean": float(masked_mean(returns, mask))}

    def compute(self, new, old, ref_logp, batch, targets, cfg):
        mask = batch.packed.target_mask
        p = cfg.objective_params
        pg, clipfrac, dualfrac = clipped_policy_loss(new.logp, old.logp, targets.advantages, mask, p.clip_eps_low,
                                                     p.clip_eps_high, cfg.loss_agg, p.clip_ratio_c, cfg.max_new_tokens)
        vl, vclip = value_loss(new.values, old.values, targets.returns, mask, p.value_clip, cfg.loss_agg,
                               cfg.max_new_tokens)
        ent = method_aggregate(new.entropy, mask, cfg)
        kl = kl_loss_term(new.logp, ref_logp, mask, cfg)
        loss = pg + p.value_weight * vl - p.entropy_coef * ent + kl
        return LossOutput(loss, {
            "pg_loss": float(pg.detach()), "value_loss": float(vl.detach()), "entropy": float(ent.detach()),
            "clipfrac": float(clipfrac), "dualclip_frac": float(dualfrac), "value_clipfrac": float(vclip),
            "kl_ref": measured_kl(new.logp, ref_logp, mask),
        })
