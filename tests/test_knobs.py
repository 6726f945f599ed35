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


def cfg(objective, **kw):
    return TrainConfig(objective=objective, task="points24", trackers=["none"], **kw)


def make_batch(mask=MASK, rewards=(1.0, 0.0), group_size=2):
    B, T = mask.shape
    packed = PackedBatch(torch.zeros(B, T + 1, dtype=torch.long), torch.ones(B, T + 1, dtype=torch.long), mask)
    r = None if rewards is None else torch.tensor(rewards)
    return Batch(packed, group_size, [None] * B, [""] * B, r)


def run_objective(name, c, batch, new, old, ref_logp=None) -> LossOutput:
    """prepare + compute of objective `name` on `batch` (the one place to adapt when the objective API changes)."""
    obj = OBJECTIVES[name]()
    prepared = obj.prepare(batch, old, ref_logp, c)
    out = obj.compute(new, old, ref_logp, batch, c)
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
    expect = {"token-mean": 10 / 4, "seq-mean-token-mean": (2 + 4) / 2, "seq-mean-token-sum-norm": (6 + 4) / 2 / 3}
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
#   seq-mean-token-sum-norm  (-3a + a) / 2 / 3 = -a / 3
GRPO_STD_A = 0.5 / (math.sqrt(0.5) + 1e-6)


@pytest.mark.parametrize("name,extra,a", [
    ("grpo", {"adv_norm_std": False}, 0.5),
    ("grpo", {"adv_norm_std": True}, GRPO_STD_A),
    ("rloo", {}, 1.0),
])
@pytest.mark.parametrize("agg,factor", [("token-mean", -1 / 2), ("seq-mean-token-mean", 0.0),
                                        ("seq-mean-token-sum-norm", -1 / 3)])
def test_loss_agg_and_advantages_reach_the_policy_gradient_objectives(name, extra, a, agg, factor):
    out, g = logp_grad(name, cfg(name, loss_agg=agg, **extra), make_batch(), HALF)
    assert out.loss.item() == pytest.approx(factor * a, abs=1e-6)
    assert out.metrics["pg_loss"] == pytest.approx(factor * a, abs=1e-6)
    assert out.metrics["ratio_mean"] == 1.0 and out.metrics["clipfrac"] == 0.0
    weights = {"token-mean": torch.tensor([[1 / 4] * 3, [1 / 4, 0, 0]]),
               "seq-mean-token-mean": torch.tensor([[1 / 6] * 3, [1 / 2, 0, 0]]),
               "seq-mean-token-sum-norm": torch.tensor([[1 / 6] * 3, [1 / 6, 0, 0]])}[agg]
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
    # pg: (-1 + 1) / 2 / 2 = 0; value loss 1/2 (1 + 0) / 2 / 2 = 0.125; entropy (2 + 4) / 2 / 2 = 1.5
    assert out.metrics["value_loss"] == pytest.approx(0.125)
    assert out.metrics["entropy"] == pytest.approx(1.5)
    assert out.loss.item() == pytest.approx(0.0 + 0.125 - 0.5 * 1.5, abs=1e-6)
    assert torch.allclose(g, torch.tensor([[-0.25, 0.0], [0.25, 0.0]]), atol=1e-6)


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

    def recording(new, old, ref_logp, b, cc):
        seen.append((new.logp.detach().clone(), old.logp.clone(), b.packed.target_mask.clone()))
        return compute(new, old, ref_logp, b, cc)

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
    from posttrain.train.objectives import Objective, register_objective

    assert {"sft", "grpo", "rloo", "ppo"} <= set(OBJECTIVES)
    assert all(OBJECTIVES[n].name == n for n in ("sft", "grpo", "rloo", "ppo"))
    assert OBJECTIVES["ppo"].needs_values and OBJECTIVES["ppo"].needs_entropy and OBJECTIVES["ppo"].needs_rewards
    assert OBJECTIVES["grpo"].needs_rewards and not OBJECTIVES["grpo"].needs_values
    assert not OBJECTIVES["sft"].needs_rewards and OBJECTIVES["sft"].default_data == "expert"
    assert OBJECTIVES["rloo"].default_data == "on_policy"
    with pytest.raises(ValueError, match="^objective 'sft' registered twice$"):
        register_objective("sft")(type("Again", (Objective,), {}))
    assert OBJECTIVES["sft"] is not None and OBJECTIVES["sft"].__name__ == "SFT"
    assert Objective().prepare(None, None, None, None) == {} and Objective().grad_groups(None, None) is None
    with pytest.raises(NotImplementedError):
        Objective().compute(None, None, None, None, None)


def test_single_token_means_divide_by_one():
    from posttrain.train.objectives import aggregate, clipped_policy_loss, masked_whiten, value_loss

    loss, mask = torch.tensor([[5.0, 9.0]]), torch.tensor([[1.0, 0.0]])
    assert aggregate(loss, mask, "token-mean").item() == 5.0
    _, frac = clipped_policy_loss(torch.log(torch.tensor([[1.5, 1.0]])), torch.zeros(1, 2), torch.tensor([1.0]), mask)
    assert frac.item() == 1.0
    _, frac = value_loss(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), mask, clip=0.2)
    assert frac.item() == 1.0
    assert torch.equal(masked_whiten(torch.tensor([[3.0, 7.0]]), mask), torch.zeros(1, 2))
    assert measured_kl(torch.tensor([[0.5, 9.0]]), torch.zeros(1, 2), mask) == 0.5
