"""Losses and advantages against hand-computed values (the numbers in comments are worked out by hand)."""

import math

import pytest
import torch

from posttrain.train.advantages import gae, grpo_advantages, rloo_advantages
from posttrain.train.objectives import aggregate, clipped_policy_loss, kl_penalty, nll_loss


def test_grpo_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(r, group_size=4, eps=1e-6)
    # group 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.577350; 0.5 / (0.577350 + 1e-6) = 0.866024
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(adv[:4], torch.tensor([expected, -expected, -expected, expected]), atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group: no signal


def test_dr_grpo_skips_std_normalisation():
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, norm_std=False)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_grpo_rejects_ragged_groups():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(5), group_size=4)


def test_rloo_hand_computed():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    # r=1: baseline (2-1)/3 = 1/3 -> 2/3 ; r=0: baseline 2/3 -> -2/3
    assert torch.allclose(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_clipped_policy_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # A=+1: ratios 1.5, 0.5; unclipped -1.5, -0.5; clipped -1.2, -0.8; max -> -1.2, -0.5; mean -0.85
    loss, clipfrac, _ = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(-0.85, abs=1e-6) and clipfrac.item() == pytest.approx(0.5)
    # A=-1: unclipped 1.5, 0.5; clipped 1.2, 0.8; max -> 1.5, 0.8; mean 1.15
    loss, clipfrac, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(1.15, abs=1e-6) and clipfrac.item() == pytest.approx(0.5)
    # asymmetric clip (DAPO clip-higher): eps_high 0.6 leaves ratio 1.5 unclipped for A>0
    loss, _, _ = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5) / 2, abs=1e-6)


def test_ratio_one_gives_reinforce_gradient():
    """With mu=1 (old = current, detached) the ratio is exactly 1 and the gradient is -A * grad log pi."""
    logits = torch.randn(2, 3, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, :2]
    adv = torch.tensor([0.7, -1.3])
    mask = torch.ones(2, 2)
    loss, clipfrac, _ = clipped_policy_loss(logp, logp.detach(), adv, mask)
    # ratio 1 everywhere: the loss is -mean(A) over the tokens, (-0.7 * 2 + 1.3 * 2) / 4
    assert clipfrac.item() == 0.0 and loss.item() == pytest.approx(0.3, abs=1e-6)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    ref = -(adv.unsqueeze(-1) * logp).sum() / 4
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g, g_ref, atol=1e-7)


def test_kl_estimators_hand_computed():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    d = math.log(2)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d, abs=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d, abs=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + d - 1, abs=1e-6)  # 0.193147
    same = kl_penalty(ref, ref, "k3")
    assert same.item() == 0.0
    with pytest.raises(ValueError, match="^unknown KL estimator 'k9'$"):
        kl_penalty(logp, ref, "k9")
    # k3 (verl's low_var_kl) is the default estimator
    assert kl_penalty(logp, ref).item() == pytest.approx(0.5 + d - 1, abs=1e-6)


def test_k3_is_unbiased_for_kl():
    """E_{y~pi}[k3] = KL(pi || ref): check on an exact categorical expectation."""
    pi = torch.tensor([0.6, 0.3, 0.1])
    ref = torch.tensor([0.2, 0.5, 0.3])
    kl = (pi * (pi / ref).log()).sum()
    k3 = (pi * kl_penalty(pi.log(), ref.log(), "k3")).sum()
    k1 = (pi * kl_penalty(pi.log(), ref.log(), "k1")).sum()
    assert k3.item() == pytest.approx(kl.item(), abs=1e-6) and k1.item() == pytest.approx(kl.item(), abs=1e-6)


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # Dr. GRPO's divisor is now the constant generation budget passed as norm_len (TRL dr_grpo), no
    # longer the batch width by default: with norm_len = 3 (= this width) the value is unchanged
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=3).item() == pytest.approx((6 + 4) / 2 / 3)
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(loss, mask, "seq-mean-token-sum-norm")
    assert nll_loss(-loss, mask).item() == pytest.approx(2.5)


def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    adv, _ = gae(r, v, m, gamma=1.0, lam=0.5)
    # A2 = 0.3; A1 = 0.1 + 0.5 * 0.3 = 0.25; A0 = 0.1 + 0.5 * 0.25 = 0.225
    assert torch.allclose(adv, torch.tensor([[0.225, 0.25, 0.3]]))


def test_gae_respects_mask():
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[9.0, 0.5, 0.7, 9.0]])  # positions 0 and 3 are masked (prompt / padding)
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    adv, _ = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv[0, 0] == 0 and adv[0, 3] == 0
    assert torch.allclose(adv[0, 1:3], torch.tensor([0.5, 0.3]))
