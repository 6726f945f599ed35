"""PPO's own parts and the clipped surrogate on uneven cases, against numbers worked out by hand."""

import math

import pytest
import torch

from posttrain.train.advantages import gae, grpo_advantages, ppo_token_rewards, rloo_advantages
from posttrain.train.objectives import aggregate, clipped_policy_loss, kl_penalty, masked_whiten, value_loss


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- value_loss ---------------------------------------------------------------------------------

def test_value_loss_takes_the_larger_branch_per_token():
    # old values 0, clip 0.2:
    #  t0: V=1.0, R=1.0 -> unclipped 0,    V_clip = 0.2,  clipped 0.64  -> 0.64 (clipped branch)
    #  t1: V=0.1, R=0.5 -> unclipped 0.16, V_clip = 0.1,  clipped 0.16  -> 0.16 (tie: not counted)
    #  t2: V=-1,  R=-1  -> unclipped 0,    V_clip = -0.2, clipped 0.64  -> 0.64 (clipped, lower side)
    #  t3: V=0.3, R=0.0 -> unclipped 0.09, V_clip = 0.2,  clipped 0.04  -> 0.09 (unclipped larger)
    #  t4: masked (huge error, must not count)
    values = T([1.0, 0.1, -1.0, 0.3, 5.0])
    old = T([0.0, 0.0, 0.0, 0.0, 0.0])
    returns = T([1.0, 0.5, -1.0, 0.0, -5.0])
    mask = T([1, 1, 1, 1, 0])
    loss, frac = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.16 + 0.64 + 0.09) / 4, abs=1e-6)
    assert frac.item() == pytest.approx(2 / 4)
    # without clipping: 1/2 mean (V - R)^2 = 1/2 (0 + 0.16 + 0 + 0.09) / 4
    loss, frac = value_loss(values, old, returns, mask, clip=None)
    assert loss.item() == pytest.approx(0.5 * 0.25 / 4, abs=1e-6) and frac.item() == 0.0
    # a wider clip leaves t0 (|V - V_old| = 1) clipped at 0.5: V_clip 0.5, clipped 0.25
    loss, frac = value_loss(values, old, returns, mask, clip=0.5)
    # t2: V_clip -0.5 -> 0.25; t3: V=0.3 inside the clip -> 0.09
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.16 + 0.25 + 0.09) / 4, abs=1e-6)
    assert frac.item() == pytest.approx(2 / 4)


def test_value_loss_aggregation_mode_is_used():
    values = T([1.0, 0.0, 0.0], [2.0, 0.0, 0.0])
    returns = torch.zeros(2, 3)
    mask = T([1, 1, 1], [1, 0, 0])
    # squared errors: row0 1, 0, 0; row1 4 (one token)
    loss, _ = value_loss(values, values, returns, mask, clip=0.2, mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.5 * (1 / 3 + 4) / 2)
    loss, _ = value_loss(values, values, returns, mask, clip=0.2, mode="token-mean")
    assert loss.item() == pytest.approx(0.5 * 5 / 4)
    # Dr. GRPO's sum-norm divides by B * norm_len (the constant max_new_tokens budget, 5 here), not
    # by the batch width 3
    loss, _ = value_loss(values, values, returns, mask, clip=None, mode="seq-mean-token-sum-norm", norm_len=5)
    assert loss.item() == pytest.approx(0.5 * (1 + 4) / 2 / 5)
    with pytest.raises(ValueError, match="norm_len"):
        value_loss(values, values, returns, mask, clip=None, mode="seq-mean-token-sum-norm")


# ---- masked_whiten ------------------------------------------------------------------------------

def test_masked_whiten_hand_computed():
    x = T([1.0, 2.0, 3.0, 100.0])
    mask = T([1, 1, 1, 0])
    # masked mean 2, population variance (1 + 0 + 1) / 3 = 2/3, std 0.816497
    out = masked_whiten(x, mask)
    s = math.sqrt(2 / 3)
    assert torch.allclose(out, T([-1 / s, 0.0, 1 / s, 0.0]), atol=1e-6)
    # shift invariance (the mean is subtracted) and scale invariance (divided by the std)
    assert torch.allclose(masked_whiten(x * 3 + 7, mask), out, atol=1e-5)
    # a two-row batch is whitened as one population, not per row
    xb = T([0.0, 2.0], [4.0, 6.0])
    out = masked_whiten(xb, torch.ones(2, 2))
    # mean 3, variance (9 + 1 + 1 + 9) / 4 = 5
    assert torch.allclose(out, (xb - 3) / math.sqrt(5), atol=1e-6)


def test_masked_whiten_eps_guards_a_constant_input():
    out = masked_whiten(T([2.0, 2.0, 2.0]), T([1, 1, 0]))
    assert torch.equal(out, torch.zeros(1, 3))
    # the eps is small: it does not visibly shrink a unit-variance input
    out = masked_whiten(T([-1.0, 1.0]), T([1, 1]))
    assert torch.allclose(out, T([-1.0, 1.0]), atol=1e-6)


# ---- PPO token rewards --------------------------------------------------------------------------

def test_ppo_token_rewards_put_the_outcome_on_the_last_completion_token():
    # row 0: prompt at t0, completion t1..t3, padding t4; row 1: completion t2 only; row 2: none
    mask = T([0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0])
    out = ppo_token_rewards(torch.tensor([1.0, 0.5, 7.0]), mask)
    assert torch.equal(out, T([0, 0, 0, 1.0, 0], [0, 0, 0.5, 0, 0], [0, 0, 0, 0, 0]))


def test_ppo_token_rewards_subtract_the_kl_per_completion_token():
    mask = T([0, 1, 1, 1], [0, 1, 1, 0])
    kl = T([9.0, 0.1, 0.2, 0.3], [9.0, -0.4, 0.5, 9.0])  # prompt / padding entries must be ignored
    out = ppo_token_rewards(torch.tensor([1.0, 0.0]), mask, kl, kl_coef=0.5)
    expected = T([0, -0.05, -0.1, 1.0 - 0.15], [0, 0.2, -0.25, 0])
    assert torch.allclose(out, expected, atol=1e-7)
    # kl_coef 0 (the default) switches the shaping off even when a KL is given
    assert torch.equal(ppo_token_rewards(torch.tensor([1.0, 0.0]), mask, kl), T([0, 0, 0, 1.0], [0, 0, 0, 0]))
    assert torch.equal(ppo_token_rewards(torch.tensor([1.0, 0.0]), mask, kl, kl_coef=0.0),
                       T([0, 0, 0, 1.0], [0, 0, 0, 0]))


# ---- GAE with gamma < 1 ------------------------------------------------------------------------

def test_gae_with_discount_hand_computed():
    r = T([0.0, 0.0, 1.0])
    v = T([0.5, 0.6, 0.7])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    # t2: delta = 1 - 0.7 = 0.3; A2 = 0.3
    # t1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03;  A1 = 0.03 + 0.72 * 0.3 = 0.246
    # t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04;  A0 = 0.04 + 0.72 * 0.246 = 0.21712
    assert torch.allclose(adv, T([0.21712, 0.246, 0.3]), atol=1e-6)
    assert torch.allclose(ret, T([0.71712, 0.846, 1.0]), atol=1e-6)
    # lam = 0: one-step TD errors; lam = 1, gamma = 0.9: discounted return minus V
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.0)
    assert torch.allclose(adv, T([0.04, 0.03, 0.3]), atol=1e-6)
    adv, _ = gae(r, v, m, gamma=0.9, lam=1.0)
    assert torch.allclose(adv, T([0.81 - 0.5, 0.9 - 0.6, 0.3]), atol=1e-6)


def test_gae_defaults_and_output_dtype():
    r = T([0.0, 0.0, 1.0]).double()
    v = T([0.5, 0.6, 0.7]).double()
    # defaults gamma = 1, lam = 0.95: A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * 0.385
    adv, ret = gae(r, v, torch.ones(1, 3))
    assert adv.dtype == torch.float32
    assert torch.allclose(adv, T([0.46575, 0.385, 0.3]), atol=1e-6)
    assert torch.allclose(ret.float(), T([0.96575, 0.985, 1.0]), atol=1e-6)


def test_gae_masked_positions_neither_bootstrap_nor_propagate():
    # row 0: prompt (t0) and padding (t3) carry junk values and rewards; row 1 ends one token earlier
    r = T([5.0, 0.0, 1.0, 5.0], [0.0, 2.0, 0.0, 0.0])
    v = T([9.0, 0.5, 0.7, 9.0], [0.0, 1.0, 0.0, 0.0])
    m = T([0, 1, 1, 0], [0, 1, 0, 0])
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5)
    # row 0: A2 = 1 - 0.7 = 0.3 (no bootstrap from the padding's V = 9); A1 = 0.5*0.7 - 0.5 + 0.25*0.3 = -0.075
    # row 1: A1 = 2 - 1 = 1
    assert torch.allclose(adv, T([0, -0.075, 0.3, 0], [0, 1.0, 0, 0]), atol=1e-6)
    assert torch.allclose(ret, T([0, 0.425, 1.0, 0], [0, 2.0, 0, 0]), atol=1e-6)


# ---- clipped surrogate: uneven cases ------------------------------------------------------------

def test_clipfrac_counts_only_the_tokens_where_the_clipped_branch_is_taken():
    # A = +1, eps 0.2: ratios 1.5, 1.4, 1.3 take the clipped branch (-1.2 > -r); 0.5 does not
    # (its clipped value -0.8 is below -0.5); ratio 1.0 is a tie; the masked token is ignored
    ratios = torch.tensor([[1.5, 1.4, 1.3, 0.5, 1.0, 3.0]])
    mask = T([1, 1, 1, 1, 1, 0])
    loss, clipfrac, dual = clipped_policy_loss(ratios.log(), torch.zeros(1, 6), torch.tensor([1.0]), mask, 0.2, 0.2)
    assert clipfrac.item() == pytest.approx(3 / 5) and dual.item() == 0.0  # the dual clip is for A < 0 only
    assert loss.item() == pytest.approx((-1.2 * 3 - 0.5 - 1.0) / 5, abs=1e-6)
    # A = -1 mirrors it: only the ratio below 1 - eps is clipped; the losses (<= 1.5) stay under the
    # dual clip's cap 3 * |A| (the masked ratio 3.0 would reach it, but is masked)
    loss, clipfrac, dual = clipped_policy_loss(ratios.log(), torch.zeros(1, 6), torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert clipfrac.item() == pytest.approx(1 / 5) and dual.item() == 0.0
    assert loss.item() == pytest.approx((1.5 + 1.4 + 1.3 + 0.8 + 1.0) / 5, abs=1e-6)


def test_clip_eps_low_and_high_act_on_their_own_side():
    ratios = torch.tensor([[1.5, 0.5]])
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    # A = -1: the low side clips ratio 0.5 at 1 - eps_low; eps_high does not matter
    for lo, expect in ((0.2, (1.5 + 0.8) / 2), (0.6, (1.5 + 0.5) / 2), (0.4, (1.5 + 0.6) / 2)):
        for hi in (0.2, 0.9):
            loss, _, _ = clipped_policy_loss(ratios.log(), old, torch.tensor([-1.0]), mask, lo, hi)
            assert loss.item() == pytest.approx(expect, abs=1e-6), (lo, hi)
    # A = +1: the high side clips ratio 1.5 at 1 + eps_high; eps_low does not matter
    for hi, expect in ((0.2, (-1.2 - 0.5) / 2), (0.3, (-1.3 - 0.5) / 2), (0.6, (-1.5 - 0.5) / 2)):
        for lo in (0.1, 0.6):
            loss, _, _ = clipped_policy_loss(ratios.log(), old, torch.tensor([1.0]), mask, lo, hi)
            assert loss.item() == pytest.approx(expect, abs=1e-6), (lo, hi)


def test_clipped_loss_takes_per_token_advantages_and_aggregation():
    ratios = torch.tensor([[1.5, 1.0], [1.0, 1.0]])
    adv = T([1.0, -2.0], [3.0, 0.0])
    mask = T([1, 1], [1, 0])
    # per-token losses: -1.2, 2.0 ; -3.0, (masked)
    loss, clipfrac, _ = clipped_policy_loss(ratios.log(), torch.zeros(2, 2), adv, mask, 0.2, 0.2, "seq-mean-token-mean")
    assert loss.item() == pytest.approx(((-1.2 + 2.0) / 2 + -3.0) / 2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)
    # sum-norm divides by B * norm_len (the generation budget, 4 here), not by the width 2
    loss, _, _ = clipped_policy_loss(ratios.log(), torch.zeros(2, 2), adv, mask, 0.2, 0.2, "seq-mean-token-sum-norm",
                                     norm_len=4)
    assert loss.item() == pytest.approx(((-1.2 + 2.0) + -3.0) / 2 / 4, abs=1e-6)
    # the dual clip acts per token on the negative advantages: A = -2 at ratio 4 costs 3 * 2, not 2 * 4
    loss, _, dual = clipped_policy_loss(torch.log(T([1.5, 4.0], [1.0, 1.0])), torch.zeros(2, 2), adv, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 6.0 - 3.0) / 3, abs=1e-6) and dual.item() == pytest.approx(1 / 3)


def test_clipped_loss_gradient_vanishes_only_on_the_clipped_side():
    logp = torch.log(torch.tensor([[1.5, 0.9]])).requires_grad_(True)
    loss, _, _ = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.2)
    (g,) = torch.autograd.grad(loss, logp)
    # token 0 clipped: no gradient; token 1: d(-A * rho)/d logp / 2 = -2 * 0.9 / 2
    assert torch.allclose(g, torch.tensor([[0.0, -0.9]]), atol=1e-6)


# ---- KL estimators and aggregation, edge cases -------------------------------------------------

def test_kl_estimators_below_the_reference():
    # log pi - log ref = -ln 2 (the policy puts less mass than the reference)
    logp, ref = torch.log(torch.tensor([0.25])), torch.log(torch.tensor([0.5]))
    d = -math.log(2)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(2.0 - math.log(2) - 1.0, abs=1e-6)
    # verl's low_var_kl clamps the result to [-10, 10] (it used to be e^20 - 21 and e^-20 + 19 here)
    big = kl_penalty(torch.tensor([-50.0]), torch.tensor([0.0]), "k3")
    assert big.item() == 10.0
    small = kl_penalty(torch.tensor([50.0]), torch.tensor([0.0]), "k3")
    assert small.item() == 10.0
    # inside the bounds: log pi - log ref = 10 gives e^-10 + 9, -2 gives e^2 - 3
    assert kl_penalty(torch.tensor([10.0, -2.0]), torch.zeros(2), "k3").tolist() == pytest.approx(
        [math.exp(-10) + 9, math.exp(2) - 3], rel=1e-6)
    # the exponent is clamped at 20 before exp: at a log-ratio of -100, e^100 would overflow float32 and
    # the clamped token's zero gradient would become 0 * inf = nan
    logp = torch.tensor([-100.0, 100.0], requires_grad=True)
    k3 = kl_penalty(logp, torch.zeros(2), "k3")
    (g,) = torch.autograd.grad(k3.sum(), logp)
    assert k3.tolist() == [10.0, 10.0] and g.tolist() == [0.0, 0.0]


def test_aggregate_handles_empty_rows_and_rejects_unknown_modes():
    loss = T([1.0, 2.0], [5.0, 5.0])
    mask = T([1, 1], [0, 0])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(1.5)
    # an empty row counts as a sequence with loss 0 (its token count is clamped to 1)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(0.75)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=4).item() == pytest.approx(3 / 2 / 4)
    assert aggregate(loss, torch.zeros(2, 2), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="loss aggregation"):
        aggregate(loss, mask, "sum")


# ---- group advantages, more shapes --------------------------------------------------------------

def test_grpo_advantages_defaults_and_errors():
    # default: normalised by the unbiased std plus eps 1e-6
    adv = grpo_advantages(torch.tensor([3.0, 1.0]), 2)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0]) / (math.sqrt(2) + 1e-6), atol=1e-7)
    assert adv.dtype == torch.float32 and grpo_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32
    with pytest.raises(ValueError, match="^5 rewards do not split into groups of 4$"):
        grpo_advantages(torch.zeros(5), 4)


def test_grpo_advantages_eps_and_group_of_one():
    r = torch.tensor([3.0, 1.0])
    # mean 2, unbiased std sqrt(2); eps enters the denominator
    assert torch.allclose(grpo_advantages(r, 2, eps=0.5), torch.tensor([1.0, -1.0]) / (math.sqrt(2) + 0.5))
    # a group of one is centred to 0 and not divided by a (nan) std
    assert torch.equal(grpo_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))


def test_rloo_advantages_three_per_group_and_rejects_groups_of_one():
    adv = rloo_advantages(torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 4.0]), 3)
    # group 0: 3 - 0, 0 - 1.5, 0 - 1.5 ; group 1: 1 - 2.5, 1 - 2.5, 4 - 1
    assert torch.allclose(adv, torch.tensor([3.0, -1.5, -1.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ValueError, match="^RLOO needs group_size >= 2$"):
        rloo_advantages(torch.tensor([1.0]), 1)


def test_value_loss_clips_at_0_2_by_default():
    # V_old = 0, V = 0.5, R = 1: unclipped (0.5 - 1)^2 = 0.25; V_clip = 0 + clip(0.5, -0.2, 0.2) = 0.2,
    # (0.2 - 1)^2 = 0.64 is larger: 1/2 * 0.64
    one = torch.ones(1, 1)
    loss, frac = value_loss(0.5 * one, 0 * one, one, one)
    assert loss.item() == pytest.approx(0.32) and frac.item() == 1.0


def test_masked_whiten_adds_eps_to_the_standard_deviation():
    # a spread of 1e-8 is within eps = 1e-8 of zero: (x - 0) / (1e-8 + 1e-8) = +-0.5
    x = torch.tensor([[1e-8, -1e-8]])
    assert torch.allclose(masked_whiten(x, torch.ones(1, 2)), torch.tensor([[0.5, -0.5]]), atol=1e-4)


def test_policy_ratio_clamps_the_log_ratio_at_both_ends():
    from posttrain.train.objectives import policy_ratio

    r = policy_ratio(torch.tensor([-30.0, 30.0, 0.5]), torch.zeros(3))
    assert r.tolist() == pytest.approx([math.exp(-20), math.exp(20), math.exp(0.5)], rel=1e-5)


def test_clipped_policy_loss_without_dual_clip_keeps_the_dr_grpo_budget():
    # per-token loss -A at ratio 1, A = (1, -1) over 3 + 1 tokens: sum = -3 + 1 = -2, over B * budget = 2 * 5
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.zeros(2, 3)
    loss, clipfrac, lower = clipped_policy_loss(logp, logp, torch.tensor([1.0, -1.0]), mask,
                                                mode="seq-mean-token-sum-norm", clip_ratio_c=None, norm_len=5)
    assert loss.item() == pytest.approx(-2 / 10) and clipfrac.item() == 0.0 and lower.item() == 0.0


def test_aggregate_defaults_and_the_budget_bounds():
    loss = T([1.0, 2.0, 3.0], [4.0, 9.0, 9.0])
    mask = T([1, 1, 1], [1, 0, 0])
    assert aggregate(loss, mask).item() == pytest.approx(10 / 4)  # token-mean by default
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=1).item() == pytest.approx(10 / 2)
    for bad in (None, 0):
        with pytest.raises(ValueError, match=r"^seq-mean-token-sum-norm needs a constant norm_len >= 1 \(the max_new_tokens budget\)$"):
            aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=bad)


def test_aggregate_over_ranks_sums_numerators_and_denominators(monkeypatch):
    """Under `reducing()` every normaliser is a sum over ranks. Simulated here: a second rank holding
    one row with a single completion token of loss 1 adds 1 to every sum (loss, tokens, rows)."""
    import posttrain.train.objectives as objectives

    monkeypatch.setattr(objectives, "reducing_over_ranks", lambda: True)
    monkeypatch.setattr(objectives, "global_sum", lambda t: t + 1)
    loss = T([1.0, 2.0, 3.0], [4.0, 9.0, 9.0])  # B = 2 rows, T = 3 positions
    mask = T([1, 1, 1], [1, 0, 0])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx((10 + 1) / (4 + 1))
    # per-sequence means 2 and 4 here, 1 there: (2 + 4 + 1) / 3 sequences
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(7 / 3)
    # (10 + 1) / (3 rows * budget 5)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=5).item() == pytest.approx(11 / 15)
