"""Every training knob reaches the math: on a tiny fixed batch, changing it changes the loss or the
gradient by the amount worked out by hand in the comments.

Objective-level tests go through `run_objective`, the one place that knows how an objective is
driven (prepare, then compute)."""

import math

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.train.data_sources import Batch
from posttrain.train.objectives import OBJECTIVES, LossOutput, PolicyOutputs, measured_kl, sequence_rewards
from posttrain.train.sequences import PackedBatch

LN2 = math.log(2)
K = {"k1": LN2, "k2": 0.5 * LN2 * LN2, "k3": LN2 - 0.5}  # k(log 0.5, log 0.25), see test_objectives

# two sequences of one group: 3 completion tokens, then 1 (width 3)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
# the generation budget: seq-mean-token-sum-norm (Dr. GRPO) divides by B * max_new_tokens, a constant,
# never by the batch's width (3 here), so the two differ on purpose
BUDGET = 5


def cfg(objective, **kw):
    kw.setdefault("max_new_tokens", BUDGET)
    return TrainConfig(objective=objective, task="points24", trackers=["none"], **kw)


def make_batch(mask=MASK, rewards=(1.0, 0.0), group_size=2):
    B, T = mask.shape
    packed = PackedBatch(torch.zeros(B, T + 1, dtype=torch.long), torch.ones(B, T + 1, dtype=torch.long), mask)
    r = None if rewards is None else torch.tensor(rewards)
    return Batch(packed, group_size, [None] * B, [""] * B, r)


def run_objective(name, c, batch, new, old, ref_logp=None) -> LossOutput:
    """prepare + compute of objective `name` on `batch` (the one place to adapt when the objective API changes)."""
    obj = OBJECTIVES[name]()
    fields = dict(vars(batch))
    rewards = None if batch.rewards is None else batch.rewards.clone()
    targets, prepared = obj.prepare(batch, old, ref_logp, c)
    # prepare returns its targets and leaves the batch as it was
    assert vars(batch).keys() == fields.keys() and all(vars(batch)[k] is v for k, v in fields.items())
    assert (rewards is None and batch.rewards is None) or torch.equal(batch.rewards, rewards)
    out = obj.compute(new, old, ref_logp, batch, targets, c)
    return LossOutput(out.loss, {**prepared, **out.metrics})  # as the loop logs them


def logp_grad(name, c, batch, logp, old_logp=None, ref_logp=None, **outputs):
    """(loss output, d loss / d new.logp) with new.logp = `logp` and old = `old_logp` (default: logp)."""
    new_logp = logp.clone().requires_grad_(True)
    new = PolicyOutputs(new_logp, outputs.get("entropy"), outputs.get("values"))
    old = PolicyOutputs(logp if old_logp is None else old_logp, None, outputs.get("old_values"))
    out = run_objective(name, c, batch, new, old, ref_logp)
    (g,) = torch.autograd.grad(out.loss, new_logp)
    return out, g


HALF = torch.full((2, 3), math.log(0.5))
QUARTER = torch.full((2, 3), math.log(0.25))


# ---- loss_agg, per objective --------------------------------------------------------------------

def test_loss_agg_reaches_sft():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -9.0, -9.0]])
    # Dr. GRPO's sum-norm: (6 + 4) / (B * max_new_tokens) = 10 / (2 * 5), not / (2 * width 3)
    expect = {"token-mean": 10 / 4, "seq-mean-token-mean": (2 + 4) / 2, "seq-mean-token-sum-norm": (6 + 4) / 2 / BUDGET}
    for agg, value in expect.items():
        out, g = logp_grad("sft", cfg("sft", loss_agg=agg), make_batch(rewards=None), logp)
        assert out.loss.item() == pytest.approx(value), agg
        assert out.metrics["nll"] == pytest.approx(value)
    # the gradient shows the weighting: token-mean weighs every token 1/4, seq-mean-token-mean the
    # three tokens of row 0 1/6 each and the single token of row 1 1/2
    _, g = logp_grad("sft", cfg("sft", loss_agg="seq-mean-token-mean"), make_batch(rewards=None), logp)
    assert torch.allclose(g, -torch.tensor([[1 / 6, 1 / 6, 1 / 6], [0.5, 0, 0]]))


# rewards (1, 0) in a group of two. Dr. GRPO: A = (0.5, -0.5); RLOO: A = (1, -1); GRPO with std:
# A = +-0.5 / (std + eps), std = sqrt(0.5). At ratio 1 the per-token loss is -A, so
#   token-mean               (-3a + a) / 4 = -a / 2
#   seq-mean-token-mean      (-a + a) / 2 = 0
#   seq-mean-token-sum-norm  (-3a + a) / (2 * BUDGET) = -a / 5   (the constant budget, not the width 3)
GRPO_STD_A = 0.5 / (math.sqrt(0.5) + 1e-6)


@pytest.mark.parametrize("name,extra,a", [
    ("grpo", {"adv_norm_std": False}, 0.5),
    ("grpo", {"adv_norm_std": True}, GRPO_STD_A),
    ("rloo", {}, 1.0),
])
@pytest.mark.parametrize("agg,factor", [("token-mean", -1 / 2), ("seq-mean-token-mean", 0.0),
                                        ("seq-mean-token-sum-norm", -2 / (2 * BUDGET))])
def test_loss_agg_and_advantages_reach_the_policy_gradient_objectives(name, extra, a, agg, factor):
    out, g = logp_grad(name, cfg(name, loss_agg=agg, **extra), make_batch(), HALF)
    assert out.loss.item() == pytest.approx(factor * a, abs=1e-6)
    assert out.metrics["pg_loss"] == pytest.approx(factor * a, abs=1e-6)
    assert out.metrics["ratio_mean"] == 1.0 and out.metrics["clipfrac"] == 0.0 and out.metrics["dualclip_frac"] == 0.0
    s = 1 / (2 * BUDGET)
    weights = {"token-mean": torch.tensor([[1 / 4] * 3, [1 / 4, 0, 0]]),
               "seq-mean-token-mean": torch.tensor([[1 / 6] * 3, [1 / 2, 0, 0]]),
               "seq-mean-token-sum-norm": torch.tensor([[s] * 3, [s, 0, 0]])}[agg]
    adv = torch.tensor([[a], [-a]])
    assert torch.allclose(g, -adv * weights, atol=1e-6)


def test_adv_eps_reaches_grpo():
    out, _ = logp_grad("grpo", cfg("grpo", adv_eps=0.5), make_batch(), HALF)
    assert out.loss.item() == pytest.approx(-0.5 / (math.sqrt(0.5) + 0.5) / 2, abs=1e-6)


def test_loss_agg_reaches_ppo():
    # one-token rows make GAE trivial: V = 0, reward r -> A = R = r; whitened over (1, 0): (+1, -1)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    batch = make_batch(mask, rewards=(1.0, 0.0))
    values = torch.zeros(2, 2)
    ent = torch.tensor([[2.0, 9.0], [4.0, 9.0]])
    c = cfg("ppo", loss_agg="seq-mean-token-sum-norm", vf_coef=1.0, entropy_coef=0.5)
    out, g = logp_grad("ppo", c, batch, torch.full((2, 2), math.log(0.5)), values=values, old_values=values, entropy=ent)
    # every term divides by B * max_new_tokens = 2 * 5 (the budget, not the width 2):
    # pg: (-1 + 1) / 10 = 0; value loss 1/2 (1 + 0) / 10 = 0.05; entropy (2 + 4) / 10 = 0.6
    assert out.metrics["value_loss"] == pytest.approx(0.05)
    assert out.metrics["entropy"] == pytest.approx(0.6)
    assert out.loss.item() == pytest.approx(0.0 + 0.05 - 0.5 * 0.6, abs=1e-6)
    assert torch.allclose(g, torch.tensor([[-0.1, 0.0], [0.1, 0.0]]), atol=1e-6)


# ---- KL: kl_mode x kl_estimator ------------------------------------------------------------------

@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("name", ["sft", "grpo", "rloo"])
def test_kl_as_a_loss_term_adds_kl_coef_times_the_estimator(name, est):
    batch = make_batch(rewards=None if name == "sft" else (1.0, 1.0))  # equal rewards: advantages 0
    base, g0 = logp_grad(name, cfg(name, kl_coef=0.0, kl_estimator=est), batch, HALF, ref_logp=QUARTER)
    out, g = logp_grad(name, cfg(name, kl_coef=0.1, kl_estimator=est), batch, HALF, ref_logp=QUARTER)
    assert out.loss.item() - base.loss.item() == pytest.approx(0.1 * K[est], abs=1e-6)
    # the KL to the base is measured (mean k1 of the new policy) whatever the coefficient
    assert out.metrics["kl_ref"] == pytest.approx(LN2, abs=1e-6) and base.metrics["kl_ref"] == pytest.approx(LN2, abs=1e-6)
    # gradient of the KL term per token, times 0.1 / 4 (token-mean over 4 tokens):
    # dk1/dlogp = 1, dk2/dlogp = logp - ref = ln 2, dk3/dlogp = 1 - exp(ref - logp) = 1/2
    dk = {"k1": 1.0, "k2": LN2, "k3": 0.5}[est]
    assert torch.allclose((g - g0)[MASK.bool()], torch.full((4,), 0.1 * dk / 4), atol=1e-6)


def test_kl_loss_term_uses_the_loss_aggregation():
    ref = torch.tensor([[math.log(0.25)] * 3, [math.log(0.125), 0.0, 0.0]])
    c0 = cfg("sft", kl_coef=0.0, loss_agg="seq-mean-token-mean", kl_estimator="k1")
    c1 = cfg("sft", kl_coef=1.0, loss_agg="seq-mean-token-mean", kl_estimator="k1")
    base, _ = logp_grad("sft", c0, make_batch(rewards=None), HALF, ref_logp=ref)
    out, _ = logp_grad("sft", c1, make_batch(rewards=None), HALF, ref_logp=ref)
    # k1 per token: row 0 ln 2 (x3), row 1 2 ln 2 -> per-sequence means ln 2 and 2 ln 2 -> 1.5 ln 2
    assert out.loss.item() - base.loss.item() == pytest.approx(1.5 * LN2, abs=1e-6)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_kl_in_the_reward_is_subtracted_per_sequence(name, est):
    """kl_mode reward: r_i - kl_coef * sum_t k(y_t). Both rewards are 1, so the advantage comes only
    from the KL: the 3-token row pays 3k, the 1-token row k. Dr. GRPO: A = (-kl_coef k, +kl_coef k);
    RLOO: A = r_i - r_j = (-2 kl_coef k, +2 kl_coef k). Nothing is added to the loss itself."""
    extra = {"adv_norm_std": False} if name == "grpo" else {}
    c = cfg(name, kl_coef=0.1, kl_mode="reward", kl_estimator=est, **extra)
    batch = make_batch(rewards=(1.0, 1.0))
    r = sequence_rewards(batch, PolicyOutputs(HALF), QUARTER, c)
    assert torch.allclose(r, torch.tensor([1 - 0.3 * K[est], 1 - 0.1 * K[est]]), atol=1e-6)
    out, g = logp_grad(name, c, batch, HALF, ref_logp=QUARTER)
    a = 0.1 * K[est] * (1 if name == "grpo" else 2)
    adv = torch.tensor([[-a], [a]])
    # token-mean over 4 tokens at ratio 1: d loss / d logp = -A / 4 on each completion token
    assert torch.allclose(g, -adv * MASK / 4, atol=1e-6)
    assert out.loss.item() == pytest.approx((3 * a - a) / 4, abs=1e-6)
    assert out.metrics["kl_ref"] == pytest.approx(LN2, abs=1e-6)


def test_no_kl_penalty_without_a_coefficient_or_a_reference():
    batch = make_batch(rewards=(1.0, 1.0))
    for c, ref in ((cfg("grpo", kl_coef=0.0, kl_mode="reward"), QUARTER), (cfg("grpo", kl_coef=0.3), None),
                   (cfg("grpo", kl_coef=0.3, kl_mode="reward"), None)):
        out, g = logp_grad("grpo", c, batch, HALF, ref_logp=ref)
        assert out.loss.item() == 0.0 and torch.equal(g, torch.zeros(2, 3))
        assert torch.equal(sequence_rewards(batch, PolicyOutputs(HALF), ref, c), torch.tensor([1.0, 1.0]))
    assert math.isnan(measured_kl(HALF, None, MASK))
    assert measured_kl(HALF, QUARTER, MASK) == pytest.approx(LN2, abs=1e-6)


# ---- clip_eps_low / clip_eps_high ---------------------------------------------------------------

@pytest.mark.parametrize("lo,hi,loss,clipfrac", [
    # row 0: A = +0.5, ratio 1.5; row 1: A = -0.5, ratio 0.5 (Dr. GRPO, token-mean over 4 tokens)
    (0.2, 0.2, (3 * -0.6 + 0.4) / 4, 1.0),     # both sides clipped: -0.5 * 1.2, 0.5 * 0.8
    (0.2, 0.6, (3 * -0.75 + 0.4) / 4, 0.25),   # eps_high 0.6 leaves 1.5 unclipped
    (0.6, 0.2, (3 * -0.6 + 0.25) / 4, 0.75),   # eps_low 0.6 leaves 0.5 unclipped
])
def test_clip_eps_reach_grpo(lo, hi, loss, clipfrac):
    old = HALF
    new = old + torch.log(torch.tensor([[1.5], [0.5]]))
    out, g = logp_grad("grpo", cfg("grpo", adv_norm_std=False, clip_eps_low=lo, clip_eps_high=hi), make_batch(),
                       new, old_logp=old)
    assert out.loss.item() == pytest.approx(loss, abs=1e-6)
    assert out.metrics["clipfrac"] == pytest.approx(clipfrac)
    # row 1's loss (<= 0.5 * 0.8) stays below the dual clip's cap 3 * 0.5
    assert out.metrics["dualclip_frac"] == 0.0
    assert out.metrics["ratio_mean"] == pytest.approx((3 * 1.5 + 0.5) / 4, abs=1e-6)


# ---- PPO: gamma, lam, vf_coef, value_clip, entropy_coef, KL in the reward ------------------------

PPO_MASK = torch.ones(1, 3)
PPO_V = torch.tensor([[0.5, 0.6, 0.7]])


def ppo(values=PPO_V, old_values=PPO_V, entropy=None, reward=1.0, ref=None, **kw):
    c = cfg("ppo", **kw)
    batch = make_batch(PPO_MASK, rewards=(reward,), group_size=1)
    ent = torch.zeros(1, 3) if entropy is None else entropy
    return logp_grad("ppo", c, batch, torch.full((1, 3), math.log(0.5)), ref_logp=ref, values=values,
                     old_values=old_values, entropy=ent)


@pytest.mark.parametrize("gamma,lam,adv", [
    (1.0, 1.0, [0.5, 0.4, 0.3]),            # R - V
    (1.0, 0.8, [0.372, 0.34, 0.3]),         # A1 = 0.1 + 0.8 * 0.3, A0 = 0.1 + 0.8 * 0.34
    (0.9, 0.8, [0.21712, 0.246, 0.3]),      # see test_ppo_parts.test_gae_with_discount_hand_computed
])
def test_gamma_and_lam_reach_ppo(gamma, lam, adv):
    out, g = ppo(gamma=gamma, lam=lam, vf_coef=0.0)
    A = torch.tensor([adv])
    # new values = old values, so V - R = -A and the value loss is 1/2 mean(A^2)
    assert out.metrics["value_loss"] == pytest.approx(0.5 * float((A * A).mean()), abs=1e-6)
    # the policy gradient uses the whitened advantages: d loss / d logp = -whiten(A) / 3
    w = (A - A.mean()) / A.var(unbiased=False).sqrt()
    assert torch.allclose(g, -w / 3, atol=1e-4)


def test_vf_coef_scales_the_value_loss_in_the_total():
    a, _ = ppo(vf_coef=0.1)
    b, _ = ppo(vf_coef=0.5)
    vl = a.metrics["value_loss"]
    assert vl > 0.01
    assert b.metrics["value_loss"] == vl
    assert b.loss.item() - a.loss.item() == pytest.approx(0.4 * vl, abs=1e-7)
    assert a.loss.item() == pytest.approx(a.metrics["pg_loss"] + 0.1 * vl, abs=1e-7)
    # unset: 1.0 with the default separate critic (its own loss, unscaled, as in verl and OpenRLHF),
    # 0.1 with a value head on the policy's trunk, where the value loss competes with the policy's
    d, _ = ppo()
    assert d.metrics["value_loss"] == vl and d.loss.item() == pytest.approx(d.metrics["pg_loss"] + vl, abs=1e-7)
    shared, _ = ppo(critic="shared")
    assert shared.loss.item() == pytest.approx(a.loss.item(), abs=1e-7)
    assert cfg("ppo").objective_params.critic == "separate"


@pytest.mark.parametrize("clip,vl,frac", [
    # old V (0.5, 0.6, 0.7), returns (1, 1, 1) (gamma = lam = 1), new V (1.0, 0.6, 0.7):
    (0.2, 0.5 * (0.09 + 0.16 + 0.09) / 3, 1 / 3),  # t0: V_clip 0.7 -> 0.09 > 0
    (None, 0.5 * (0.0 + 0.16 + 0.09) / 3, 0.0),
    (1.0, 0.5 * (0.0 + 0.16 + 0.09) / 3, 0.0),     # a wide clip changes nothing
])
def test_value_clip_reaches_ppo(clip, vl, frac):
    out, _ = ppo(values=torch.tensor([[1.0, 0.6, 0.7]]), gamma=1.0, lam=1.0, value_clip=clip)
    assert out.metrics["value_loss"] == pytest.approx(vl, abs=1e-6)
    assert out.metrics["value_clipfrac"] == pytest.approx(frac)


def test_entropy_coef_subtracts_the_mean_entropy():
    ent = torch.tensor([[1.0, 2.0, 6.0]])
    a, _ = ppo(entropy=ent, entropy_coef=0.0)
    b, _ = ppo(entropy=ent, entropy_coef=0.01)
    assert b.metrics["entropy"] == pytest.approx(3.0)
    assert b.loss.item() - a.loss.item() == pytest.approx(-0.03, abs=1e-7)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_in_the_reward_reaches_ppo_token_rewards(est):
    # V = 0, gamma = lam = 1: returns are the reward-to-go of r_t = -0.1 k (+1 on the last token)
    zero = torch.zeros(1, 3)
    out, _ = ppo(values=zero, old_values=zero, ref=torch.full((1, 3), math.log(0.25)), kl_coef=0.1,
                 kl_mode="reward", kl_estimator=est, gamma=1.0, lam=1.0)
    k = 0.1 * K[est]
    R = torch.tensor([1 - 3 * k, 1 - 2 * k, 1 - k])
    assert out.metrics["value_loss"] == pytest.approx(0.5 * float((R * R).mean()), abs=1e-6)
    # as a loss term instead: returns are the bare reward, the loss gains 0.1 * k
    plain, _ = ppo(values=zero, old_values=zero, gamma=1.0, lam=1.0)
    loss_mode, _ = ppo(values=zero, old_values=zero, ref=torch.full((1, 3), math.log(0.25)), kl_coef=0.1,
                       kl_mode="loss", kl_estimator=est, gamma=1.0, lam=1.0)
    assert loss_mode.metrics["value_loss"] == plain.metrics["value_loss"] == pytest.approx(0.5)
    assert loss_mode.loss.item() - plain.loss.item() == pytest.approx(k, abs=1e-6)


# ---- num_iterations and minibatches (the loop) ---------------------------------------------------

@pytest.mark.parametrize("mu,minibatches", [(1, 1), (2, 1), (3, 2)])
def test_num_iterations_reuses_the_old_policy_for_mu_updates(tiny_checkpoint, tmp_path, mu, minibatches):
    from posttrain.models.loading import load_model
    from posttrain.train.loop import _update, make_accelerator, make_optimizer, make_scheduler
    from posttrain.train.sequences import pack

    model, _ = load_model(tiny_checkpoint)
    model.train()
    packed = pack([[1, 40, 41]] * 2 + [[1, 50]] * 2, [[60, 61, 2], [62, 2], [70, 2], [71, 72, 73, 2]], 0, group_size=2)
    batch = Batch(packed, 2, [None] * 4, [""] * 4, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    c = cfg("grpo", num_iterations=mu, minibatches=minibatches, lr=1e-2)
    obj = OBJECTIVES["grpo"]()
    seen = []
    compute = obj.compute

    def recording(new, old, ref_logp, b, targets, cc):
        seen.append((new.logp.detach().clone(), old.logp.clone(), b.packed.target_mask.clone()))
        return compute(new, old, ref_logp, b, targets, cc)

    obj.compute = recording
    params = list(model.parameters())
    opt = make_optimizer(params, c.lr, 0.0)
    sched = make_scheduler(opt, "constant", 0, 10)
    before = [p.detach().clone() for p in params]
    row = _update(c, obj, model, None, None, batch, opt, sched, make_accelerator("cpu", []), params, 0, 0, tmp_path)
    assert len(seen) == mu * minibatches
    assert opt.state[params[0]]["step"].item() == mu * minibatches
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    new0, old0, m0 = seen[0]
    # the first update's ratio is exactly 1; every later one compares with the same old log-probs
    assert torch.equal(new0 * m0, old0 * m0)
    if mu > 1:
        new_last, old_last, m_last = seen[-1]
        assert not torch.allclose(new_last * m_last, old_last * m_last, atol=1e-4)
        assert row["ratio_mean"] != 1.0
    else:
        assert row["ratio_mean"] == 1.0


# ---- freezing rules ------------------------------------------------------------------------------

def test_freezing_rules_select_by_name_and_layer(tiny_checkpoint):
    from posttrain.errors import UserError
    from posttrain.models.loading import load_model
    from posttrain.train.freezing import apply_freezing, parse_rule

    model, _ = load_model(tiny_checkpoint)
    names = [n for n, _ in model.named_parameters()]
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())

    def trainable(freeze=(), train_only=()):
        rep = apply_freezing(model, list(freeze), list(train_only))
        on = {n for n, p in model.named_parameters() if p.requires_grad}
        assert rep.trainable == sum(sizes[n] for n in on) and rep.total == sum(sizes.values())
        assert set(rep.frozen_names) == set(names) - on
        return on

    assert trainable() == set(names)
    # "@1" restricts a rule to layer 1; "@0-1" to layers 0..1 inclusive
    assert trainable(["*.mlp.*@1"]) == {n for n in names if ".layers.1.mlp." not in n}
    assert trainable(["*.mlp.*@0-1"]) == {n for n in names if ".mlp." not in n}
    assert trainable(["*.mlp.*@1-1"]) == trainable(["*.mlp.*@1"])
    # regular expressions use re.search; train_only freezes what it does not match, freeze then wins
    qk = {n for n in names if "q_proj" in n or "k_proj" in n}
    assert trainable(train_only=["re:q_proj|k_proj"]) == qk
    assert trainable(["re:layers\\.0\\."], ["re:q_proj|k_proj"]) == {n for n in qk if ".layers.1." in n}
    assert parse_rule("*.mlp.*@2-5").layers == (2, 5) and parse_rule("re:x@3").layers == (3, 3)
    with pytest.raises(UserError, match="layer range"):
        parse_rule("re:a@b")
    with pytest.raises(UserError, match="no trainable"):
        apply_freezing(model, ["*"])
    with pytest.raises(UserError, match="empty pattern"):
        parse_rule("@1")


# ---- what prepare reports, and which groups may skip the backward ---------------------------------

def test_prepare_metrics():
    out, _ = logp_grad("grpo", cfg("grpo", adv_norm_std=False), make_batch(), HALF)
    assert out.metrics["adv_abs_mean"] == pytest.approx(0.5) and out.metrics["groups_zero_adv"] == 0.0
    batch = make_batch(torch.ones(4, 3), rewards=(1.0, 0.0, 1.0, 1.0))
    out, _ = logp_grad("rloo", cfg("rloo"), batch, torch.full((4, 3), math.log(0.5)))
    # group 0: A = (1, -1); group 1: all equal -> 0
    assert out.metrics["adv_abs_mean"] == pytest.approx(0.5) and out.metrics["groups_zero_adv"] == 0.5
    out, _ = ppo(values=torch.tensor([[1.0, 2.0, 6.0]]), old_values=torch.tensor([[1.0, 2.0, 6.0]]), gamma=1.0, lam=1.0)
    # returns = A + V with A_t = 1 - V_t (lam = gamma = 1): all 1
    assert out.metrics["value_mean"] == pytest.approx(3.0) and out.metrics["return_mean"] == pytest.approx(1.0)


def test_grad_groups_only_when_some_groups_have_zero_advantage():
    from posttrain.train.sequences import pack

    def batch(rewards):
        packed = pack([[1, 5]] * 2 + [[1, 6]] * 2, [[7, 2], [8, 2], [7, 2], [9, 2]], 0, group_size=2)
        return Batch(packed, 2, [None] * 4, [""] * 4, None if rewards is None else torch.tensor(rewards))

    for name in ("grpo", "rloo"):
        obj, c = OBJECTIVES[name](), cfg(name)
        assert obj.grad_groups(batch([1.0, 0.0, 1.0, 1.0]), c) == [0]
        assert obj.grad_groups(batch([1.0, 1.0, 0.0, 1.0]), c) == [1]
        assert obj.grad_groups(batch([1.0, 0.0, 1.0, 0.0]), c) is None  # every group live
        assert obj.grad_groups(batch([1.0, 1.0, 0.0, 0.0]), c) is None  # none live
        assert obj.grad_groups(batch(None), c) is None
        assert obj.grad_groups(batch([1.0, 0.0, 1.0, 1.0]), cfg(name, kl_coef=0.01)) is None
        b = batch([1.0, 0.0, 1.0, 1.0])
        b.packed = b.packed.padded()
        assert obj.grad_groups(b, c) is None
    for name in ("sft", "ppo"):
        assert OBJECTIVES[name]().grad_groups(batch([1.0, 0.0, 1.0, 1.0]), cfg(name)) is None


def test_objective_registry():
    from posttrain.train.objectives import Objective, Targets, register_objective

    assert {"sft", "grpo", "rloo", "ppo"} <= set(OBJECTIVES)
    assert all(OBJECTIVES[n].name == n for n in ("sft", "grpo", "rloo", "ppo"))
    t = {n: OBJECTIVES[n].traits for n in ("sft", "grpo", "rloo", "ppo")}
    assert t["ppo"].needs_critic and t["ppo"].needs_entropy and t["ppo"].rl
    assert t["grpo"].rl and not t["grpo"].needs_critic and not t["grpo"].needs_entropy
    assert not t["sft"].rl and not t["sft"].needs_critic and t["sft"].default_data == "expert"
    assert t["rloo"].default_data == "on_policy" and t["ppo"].default_data == "on_policy"
    # GRPO and RLOO are one clipped objective with their own default estimator; PPO's is token-level
    assert {n: (OBJECTIVES[n].estimator_level, OBJECTIVES[n].default_estimator) for n in t} == {
        "sft": (None, None), "grpo": ("sequence", "grpo"), "rloo": ("sequence", "rloo"), "ppo": ("token", "gae")}
    assert cfg("grpo").needs_groups and cfg("rloo").needs_groups and not cfg("ppo").needs_groups
    assert not cfg("sft").needs_groups
    with pytest.raises(ValueError, match="^objective 'sft' registered twice$"):
        register_objective("sft")(type("Again", (Objective,), {}))
    assert OBJECTIVES["sft"] is not None and OBJECTIVES["sft"].__name__ == "SFT"
    assert Objective().prepare(None, None, None, None) == (Targets(), {}) and Objective().grad_groups(None, None) is None
    with pytest.raises(NotImplementedError):
        Objective().compute(None, None, None, None, None, None)


def test_single_token_means_divide_by_one():
    from posttrain.train.objectives import aggregate, clipped_policy_loss, masked_whiten, value_loss

    loss, mask = torch.tensor([[5.0, 9.0]]), torch.tensor([[1.0, 0.0]])
    assert aggregate(loss, mask, "token-mean").item() == 5.0
    _, frac, dual = clipped_policy_loss(torch.log(torch.tensor([[1.5, 1.0]])), torch.zeros(1, 2), torch.tensor([1.0]), mask)
    assert frac.item() == 1.0 and dual.item() == 0.0
    # a negative advantage at ratio 4 (beyond the cap 3): the one token counts fully for the dual clip
    _, frac, dual = clipped_policy_loss(torch.log(torch.tensor([[4.0, 1.0]])), torch.zeros(1, 2), torch.tensor([-1.0]), mask)
    assert frac.item() == 0.0 and dual.item() == 1.0
    _, frac = value_loss(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), mask, clip=0.2)
    assert frac.item() == 1.0
    assert torch.equal(masked_whiten(torch.tensor([[3.0, 7.0]]), mask), torch.zeros(1, 2))
    assert measured_kl(torch.tensor([[0.5, 9.0]]), torch.zeros(1, 2), mask) == 0.5


# ---- the estimator registry: knobs are an estimator's keyword-only arguments ------------------------

def test_register_estimator_types_the_keyword_only_arguments_as_knobs():
    from typing import Annotated

    from pydantic import Field, ValidationError

    from posttrain.train.advantages import ESTIMATORS, register_estimator

    def toy(rewards, group_size, *, scale: Annotated[float, Field(gt=0)] = 2.0, flip: bool = False, free=3):
        return rewards * scale

    try:
        assert register_estimator("toy_scale")(toy) is toy
        est = ESTIMATORS["toy_scale"]
        assert (est.name, est.fn, est.level, est.needs_groups, est.needs_critic) == ("toy_scale", toy, "sequence",
                                                                                     False, False)
        P = est.params
        assert P.__name__ == "toy_scale_params"
        # the positional arguments are the estimator's inputs, not knobs
        assert list(P.model_fields) == ["scale", "flip", "free"]
        assert P().model_dump() == {"scale": 2.0, "flip": False, "free": 3}
        assert P(scale=0.5, flip=True).model_dump() == {"scale": 0.5, "flip": True, "free": 3}
        with pytest.raises(ValidationError, match="greater than 0"):
            P(scale=0)  # the annotation's constraint is kept
        with pytest.raises(ValidationError, match="valid number"):
            P(scale="x")
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            P(other=1)
        assert P(free="anything").free == "anything"  # an unannotated knob takes any value
        register_estimator("toy_token", level="token", needs_groups=True)(toy)
        t = ESTIMATORS["toy_token"]
        assert (t.level, t.needs_groups, t.needs_critic) == ("token", True, True)
    finally:
        ESTIMATORS.pop("toy_scale", None)
        ESTIMATORS.pop("toy_token", None)
    with pytest.raises(ValueError, match=r"^estimator 'x': level must be 'sequence' or 'token', not 'tok'$"):
        register_estimator("x", level="tok")
    assert "x" not in ESTIMATORS
    # the built-in estimators' knobs and defaults
    assert {n: ESTIMATORS[n].params().model_dump() for n in ("grpo", "dr_grpo", "rloo", "gae")} == {
        "grpo": {"adv_norm_std": True, "adv_eps": 1e-6}, "dr_grpo": {}, "rloo": {}, "gae": {"gamma": 1.0, "lam": 0.95}}
    assert [(n, ESTIMATORS[n].level, ESTIMATORS[n].needs_groups) for n in ("grpo", "dr_grpo", "rloo", "gae")] == [
        ("grpo", "sequence", True), ("dr_grpo", "sequence", True), ("rloo", "sequence", True), ("gae", "token", False)]


# ---- clip_ratio_c (dual clip) -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["grpo", "rloo"])
@pytest.mark.parametrize("clip_c,row1,dualfrac", [(3.0, 3 * 1.0, 1.0), (2.0, 2 * 1.0, 1.0), (None, 10 * 1.0, 0.0)])
def test_clip_ratio_c_caps_a_negative_advantage_tokens_loss(name, clip_c, row1, dualfrac):
    # rewards (1, 0): Dr. GRPO A = (+0.5, -0.5), RLOO A = (+1, -1); scale both to |A| = 1 below.
    # Row 1 (A = -1, 1 token) had its ratio explode to 10: L1 = max(1 * 10, 1 * 1.2) = 10, capped
    # at clip_ratio_c * |A|; row 0 (A = +1, ratio 1) contributes -1 per token. token-mean over 4 tokens.
    extra = {"adv_norm_std": False} if name == "grpo" else {}
    scale = 2.0 if name == "grpo" else 1.0
    old = HALF
    new = old + torch.log(torch.tensor([[1.0], [10.0]]))
    batch = make_batch(rewards=(scale * 1.0, 0.0))
    out, g = logp_grad(name, cfg(name, clip_ratio_c=clip_c, **extra), batch, new, old_logp=old)
    assert out.loss.item() == pytest.approx((3 * -1.0 + row1) / 4, rel=1e-5)
    # dualclip_frac is over completion tokens: 1 of 4 when the cap binds
    assert out.metrics["dualclip_frac"] == pytest.approx(dualfrac / 4)
    # a capped token has zero gradient; uncapped, row 1 gets d(-A rho)/d logp = rho / 4 = 2.5
    assert g[1, 0].item() == pytest.approx(0.0 if clip_c else 2.5, abs=1e-6)


# ---- Targets.select (minibatches) --------------------------------------------------------------

def test_targets_select_takes_the_rows_and_cuts_per_token_targets_to_the_width():
    from posttrain.train.objectives import Targets

    adv = torch.tensor([1.0, 2.0, 3.0])  # per sequence
    ret = torch.arange(12.0).reshape(3, 4)  # per token, 4 target positions (width 5)
    t = Targets(adv, ret).select(torch.tensor([2, 0]), 3)
    assert torch.equal(t.advantages, torch.tensor([3.0, 1.0]))
    assert torch.equal(t.returns, torch.tensor([[8.0, 9.0], [0.0, 1.0]]))
    # PPO's per-token advantages are cut like the returns
    t = Targets(ret, None).select(torch.tensor([1]), 4)
    assert torch.equal(t.advantages, torch.tensor([[4.0, 5.0, 6.0]])) and t.returns is None
    assert Targets().select(torch.tensor([0]), 3) == Targets()


def test_register_objective_names_and_registers_the_class():
    from posttrain.train.objectives import Objective, register_objective

    try:
        cls = register_objective("toy_knob_objective")(type("Toy", (Objective,), {}))
        assert OBJECTIVES["toy_knob_objective"] is cls and cls.name == "toy_knob_objective"
    finally:
        OBJECTIVES.pop("toy_knob_objective", None)


@pytest.mark.parametrize("clip_c,pg,dualfrac", [(3.0, (-1.2 + 3.0) / 2, 0.5), (None, (-1.2 + 10.0) / 2, 0.0)])
def test_ppo_dual_clip_and_its_metrics(clip_c, pg, dualfrac):
    # two one-token rows, rewards (1, 0), V = 0: GAE gives A = (1, 0), whitened (+1, -1).
    # Row 0 (A = +1) at ratio 1.5 is clipped to 1.2: -1.2 (clipfrac 1/2); row 1 (A = -1) at ratio 10:
    # max(10, 1.2) = 10, capped at clip_ratio_c * |A| = 3 (dualclip_frac 1/2). token-mean over 2 tokens.
    mask = torch.ones(2, 1)
    batch = make_batch(mask, rewards=(1.0, 0.0))
    old = torch.full((2, 1), math.log(0.5))
    new = old + torch.log(torch.tensor([[1.5], [10.0]]))
    zeros = torch.zeros(2, 1)
    out, _ = logp_grad("ppo", cfg("ppo", vf_coef=0.0, clip_ratio_c=clip_c), batch, new, old_logp=old,
                       ref_logp=new - 0.25, values=zeros, old_values=zeros, entropy=zeros)
    assert out.loss.item() == pytest.approx(pg, rel=1e-5)
    m = out.metrics
    assert m["pg_loss"] == pytest.approx(pg, rel=1e-5) and m["value_loss"] == pytest.approx(0.25)
    assert m["clipfrac"] == 0.5 and m["dualclip_frac"] == dualfrac and m["value_clipfrac"] == 0.0
    assert m["kl_ref"] == pytest.approx(0.25) and m["entropy"] == 0.0
