"""RL math against the reference implementations (verl b178a3cd, TRL f2cd5771, OpenRLHF 3c3be623,
Echo Chamber's openrlhf-pretrain 34d239da), on hand-computed values; numbers in comments are worked
out by hand."""

import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import TrainConfig
from posttrain.models.loading import load_model
from posttrain.tasks import Problem, build_task
from posttrain.train.data_sources import Batch
from posttrain.train.objectives import (OBJECTIVES, PPO, SFT, PolicyOutputs, aggregate, clipped_policy_loss,
                                        kl_loss_term, kl_penalty, masked_mean, masked_whiten, policy_ratio)
from posttrain.train.sequences import PackedBatch, encode_completions, encode_prompts, pack


def _padded(loss_rows: list[list[float]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.zeros(len(loss_rows), width)
    mask = torch.zeros(len(loss_rows), width)
    for i, r in enumerate(loss_rows):
        loss[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1.0
    return loss, mask


# ---------------------------------------------------------------------------------------------
# 1. Dr. GRPO: a constant divisor


def test_dr_grpo_divides_by_the_budget_whatever_the_padded_width():
    # the same two sequences padded to width 4 and to width 7: sums 1+2+3 = 6 and 4, over B=2 rows
    # and the budget 16: (6 + 4) / (2 * 16) = 0.3125 in both (the old width divisor gave 10/2/4 and 10/2/7)
    for width in (4, 7):
        loss, mask = _padded([[1.0, 2.0, 3.0], [4.0]], width)
        assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=16).item() == pytest.approx(0.3125)


def _batch(completions: list[str], width_pad: int, tok, rewards=None, group_size=1) -> Batch:
    """A batch of prompt "q:" + completions, padded `width_pad` tokens wider than needed."""
    prompts = encode_prompts(tok, ["q:"] * len(completions))
    comps = encode_completions(tok, completions)
    p = pack(prompts, comps, tok.pad_token_id, group_size=group_size)
    pad = torch.full((p.input_ids.shape[0], width_pad), tok.pad_token_id)
    zeros = torch.zeros(p.input_ids.shape[0], width_pad)
    packed = PackedBatch(torch.cat([p.input_ids, pad], 1), torch.cat([p.attention_mask, zeros.long()], 1),
                         torch.cat([p.target_mask, zeros], 1), None, p.pad_id)
    r = None if rewards is None else torch.tensor(rewards)
    return Batch(packed, group_size, [None] * len(completions), completions, r)


def test_dr_grpo_objective_and_kl_terms_use_max_new_tokens(tiny_checkpoint):
    """The Dr. GRPO recipe on a fixed batch ("ab" + EOS: 3 completion tokens, "c" + EOS: 2) padded to
    two widths: every term divides its per-sequence sums by B * max_new_tokens = 2 * 10."""
    _, tok = load_model(tiny_checkpoint)
    c = TrainConfig(objective="grpo", task="coin", samples_per_prompt=2, adv_norm_std=False,
                    loss_agg="seq-mean-token-sum-norm", max_new_tokens=10, trackers=["none"])
    obj = OBJECTIVES["grpo"]()
    for extra in (0, 5):
        batch = _batch(["ab", "c"], extra, tok, rewards=[1.0, 0.0], group_size=2)
        assert batch.packed.target_mask.sum().item() == 5
        logp = torch.full(batch.packed.target_mask.shape, -0.7)
        old = PolicyOutputs(logp)
        targets, _ = obj.prepare(batch, old, None, c)
        assert torch.allclose(targets.advantages, torch.tensor([0.5, -0.5]))
        out = obj.compute(PolicyOutputs(logp.clone()), old, None, batch, targets, c)
        # A = +-0.5: sums -0.5 * 3 = -1.5 and +0.5 * 2 = 1.0; (-1.5 + 1.0) / (2 * 10) = -0.025
        assert out.metrics["pg_loss"] == pytest.approx(-0.025, abs=1e-7)
        # the KL term: k1 = 0.3 on every token, sums 0.9 and 0.6, kl_coef 0.5: 0.5 * 1.5 / 20 = 0.0375
        ref = torch.full_like(logp, -1.0)
        kl = kl_loss_term(logp, ref, batch.packed.target_mask, c.model_copy(update={"kl_coef": 0.5, "kl_estimator": "k1"}))
        assert kl.item() == pytest.approx(0.0375, abs=1e-7)
        # SFT's NLL: sums 0.7 * 3 and 0.7 * 2 over 20 = 0.175
        s = TrainConfig(objective="sft", task="coin", loss_agg="seq-mean-token-sum-norm", max_new_tokens=10, trackers=["none"])
        assert SFT().compute(PolicyOutputs(logp), old, None, batch, targets, s).loss.item() == pytest.approx(0.175)


# ---------------------------------------------------------------------------------------------
# 2. temperature: 1 for SFT-type losses, the sampling temperature for RL (reference included)


@pytest.mark.parametrize("objective,expected_t", [("sft", 1.0), ("grpo", 0.5)])
def test_loss_temperature_of_policy_and_reference(coin_checkpoint, tiny_checkpoint, objective, expected_t):
    from posttrain.train.loop import _update, make_accelerator, make_optimizer, make_scheduler
    from posttrain.train.policy import policy_forward

    model, tok = load_model(coin_checkpoint)
    ref, _ = load_model(tiny_checkpoint)  # another model, so the KL to it is not 0
    c = TrainConfig(objective=objective, task="coin", temperature=0.5, kl_coef=0.1, samples_per_prompt=2,
                    trackers=["none"])
    assert OBJECTIVES[objective]().logit_temperature(c) == expected_t
    batch = _batch(["ab", "c", "de", "f"], 0, tok, rewards=[1.0, 0.0, 0.0, 1.0], group_size=2)
    m = batch.packed.target_mask

    def measured(t):
        with torch.no_grad():
            new, r = policy_forward(model, batch.packed, t).logp, policy_forward(ref, batch.packed, t).logp
        return float(masked_mean(new - r, m)), float(masked_mean(-new, m))

    kl_t, nll_t = measured(expected_t)
    kl_other, nll_other = measured(1.5 - expected_t)  # the other temperature of the two
    params = list(model.parameters())
    opt = make_optimizer(params, 1e-3, 0.0)
    out = _update(c, OBJECTIVES[objective](), model, ref, None, batch, opt, make_scheduler(opt, "constant", 0, 1),
                  make_accelerator("cpu"), params, 0, 0, None)
    assert out["kl_ref"] == pytest.approx(kl_t, rel=1e-5) and abs(kl_t - kl_other) > 1e-3
    if objective == "sft":
        assert out["nll"] == pytest.approx(nll_t, rel=1e-5) and abs(nll_t - nll_other) > 1e-3


# ---------------------------------------------------------------------------------------------
# 3. dual-clip, log-ratio clamp, k3 clamp, whitening


def test_dual_clip_hand_computed():
    logp = torch.log(torch.tensor([[4.0, 0.5, 1.0]])).requires_grad_(True)
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    # A = -1: unclipped 4, 0.5, 1; clipped (ratio in [0.8, 1.2]) 1.2, 0.8, 1; max 4, 0.8, 1; the dual
    # clip caps at -3 * A = 3: 3, 0.8, 1 -> mean 4.8 / 3 = 1.6 (without it: 5.8 / 3)
    loss, clipfrac, dual = clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(1.6, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3) and dual.item() == pytest.approx(1 / 3)
    (g,) = torch.autograd.grad(loss, logp)
    # the capped token has no gradient; token 3 (ratio 1, unclipped branch): d(-A rho)/dlogp / 3 = 1/3
    assert g[0, 0].item() == 0.0 and g[0, 1].item() == 0.0 and g[0, 2].item() == pytest.approx(1 / 3)
    off, _, dual_off = clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_ratio_c=None)
    assert off.item() == pytest.approx(5.8 / 3, abs=1e-6) and dual_off.item() == 0.0
    # c = 2: 2, 0.8, 1 -> 3.8 / 3
    two, _, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_ratio_c=2.0)
    assert two.item() == pytest.approx(3.8 / 3, abs=1e-6)
    # A = +1 is never dual-clipped: unclipped -4, -0.5, -1; clipped -1.2, -0.8, -1; max -> -1.2, -0.5, -1
    pos, _, dual_pos = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask)
    assert pos.item() == pytest.approx(-2.7 / 3, abs=1e-6) and dual_pos.item() == 0.0
    # the boundary: ratio exactly 3 with A = -1 gives L1 = 3 = the cap: loss 3, not counted as capped
    at, _, dual_at = clipped_policy_loss(torch.log(torch.tensor([[3.0]])), torch.zeros(1, 1), torch.tensor([-1.0]),
                                         torch.ones(1, 1))
    assert at.item() == pytest.approx(3.0, abs=1e-6) and dual_at.item() == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c"):
        clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_ratio_c=1.0)


def test_dual_clip_is_a_knob_of_the_clipped_objectives():
    for obj in ("grpo", "rloo", "ppo"):
        assert TrainConfig(objective=obj, task="coin").objective_params.clip_ratio_c == 3.0
        assert TrainConfig(objective=obj, task="coin", clip_ratio_c=None).objective_params.clip_ratio_c is None
        with pytest.raises(ValueError, match="clip_ratio_c"):
            TrainConfig(objective=obj, task="coin", clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        TrainConfig(objective="sft", task="coin", clip_ratio_c=3.0)


def test_log_ratio_is_clamped_to_20_before_exp():
    d = torch.tensor([25.0, 20.0, 19.0, -30.0], requires_grad=True)
    ratio = policy_ratio(d, torch.zeros(4))
    expected = torch.tensor([math.exp(20), math.exp(20), math.exp(19), math.exp(-20)])
    assert torch.allclose(ratio, expected, rtol=1e-6)
    (g,) = torch.autograd.grad(ratio.sum(), d)
    assert g[0].item() == 0.0 and g[3].item() == 0.0 and g[2].item() == pytest.approx(math.exp(19), rel=1e-6)
    # without a dual clip, A = -1 on a log-ratio of 25 costs e^20 (485165195.4), not e^25
    loss, _, _ = clipped_policy_loss(torch.tensor([[25.0]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1),
                                     clip_ratio_c=None)
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-6)


def test_k3_is_clamped_to_10_after_the_exponent_clamp():
    x = torch.tensor([2.0, 2.6, 2.62, 3.0, 25.0, -10.0, -12.0])  # x = log pi_ref - log pi
    logp = torch.zeros(7, requires_grad=True)
    k3 = kl_penalty(logp, x, "k3")
    # e^x - x - 1: 4.389056, 9.863738, 10.115690 -> 10, 16.085537 -> 10, (x clamped to 20) -> 10,
    # 9.0000454, 11.0000061 -> 10
    expected = torch.tensor([math.exp(2) - 3, math.exp(2.6) - 3.6, 10.0, 10.0, 10.0, math.exp(-10) + 9, 10.0])
    assert torch.allclose(k3, expected, atol=1e-5)
    (g,) = torch.autograd.grad(k3.sum(), logp)
    # d k3 / d log pi = -(e^x - 1) where not clamped, 0 where clamped
    assert g[0].item() == pytest.approx(-(math.exp(2) - 1), rel=1e-5)
    assert all(g[i].item() == 0.0 for i in (2, 3, 4, 6))
    # k1 and k2 are not clamped (as in verl)
    assert kl_penalty(torch.zeros(1), torch.tensor([-30.0]), "k1").item() == 30.0
    assert kl_penalty(torch.zeros(1), torch.tensor([-30.0]), "k2").item() == 450.0


def test_masked_whiten_uses_the_biased_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 99.0]])
    m = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    # mean 3, biased variance (4 + 1 + 0 + 1 + 4) / 5 = 2 (OpenRLHF); verl's unbiased 2.5 would give +-1.2649
    s = math.sqrt(2)
    assert torch.allclose(masked_whiten(x, m), torch.tensor([[-2 / s, -1 / s, 0, 1 / s, 2 / s, 0]]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. PPO's separate critic


def test_ppo_separate_critic_stays_out_of_the_policy_checkpoint(coin_checkpoint, tmp_path):
    from posttrain.analysis.checkpoints import Checkpoint
    from posttrain.train.loop import train

    c = TrainConfig(objective="ppo", task="coin", steps=2, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=4,
                    lr=1e-3, critic_lr=3e-3, checkpoint_every=1, trackers=["none"])
    res = train(c, init_dir=coin_checkpoint, ref_dir=coin_checkpoint, out_dir=tmp_path, task=build_task("coin"),
                expert_format=None, seed=0, device="cpu")
    base = Checkpoint(coin_checkpoint)
    for d in (res.model_dir, tmp_path / "checkpoints" / "step-1", tmp_path / "checkpoints" / "step-2"):
        assert sorted(Checkpoint(d).names()) == sorted(base.names())  # what `posttrain diff` reads
    assert not (tmp_path / "value_head.safetensors").exists()
    for d in (tmp_path, tmp_path / "checkpoints" / "step-1"):
        assert (d / "critic" / "value_head.safetensors").is_file() and (d / "critic" / "config.json").is_file()
    trunk = load_file(str(tmp_path / "critic" / "model.safetensors"))
    # the critic's trunk started as the init's and trained (the zero head moves it from step 2 on)
    assert set(trunk) == {k.removeprefix("model.") for k in base.names() if k.startswith("model.")}
    assert any(not torch.equal(v, base.get("model." + k)) for k, v in trunk.items())
    log = [__import__("json").loads(x) for x in res.metrics_path.read_text().splitlines()[1:]]
    assert all(r["lr"] == 1e-3 and r["critic_lr"] == 3e-3 and r["critic_grad_norm"] > 0 for r in log)


def test_value_loss_moves_only_the_critic_when_separate(tiny_checkpoint):
    """With a separate critic the policy's gradient does not depend on the value loss's weight; on a
    shared trunk (a nonzero head) it does."""
    from posttrain.train.policy import Critic, ValueHead, policy_forward

    model, tok = load_model(tiny_checkpoint)
    batch = _batch(["ab", "c", "de", "f"], 0, tok, rewards=[1.0, 0.0, 0.0, 1.0])
    critic, head = Critic.from_checkpoint(tiny_checkpoint), ValueHead(model.config.hidden_size)
    g = torch.Generator().manual_seed(0)
    for h in (critic.head, head):
        torch.nn.init.normal_(h.proj.weight, generator=g)

    def policy_grad(values_from, mode, vf_coef):
        c = TrainConfig(objective="ppo", task="coin", critic=mode, vf_coef=vf_coef, trackers=["none"])
        with torch.no_grad():
            old = policy_forward(model, batch.packed, 1.0, False, values_from)
        targets, _ = PPO().prepare(batch, old, None, c)
        model.zero_grad(set_to_none=True)
        new = policy_forward(model, batch.packed, 1.0, True, values_from)
        out = PPO().compute(new, old, None, batch, targets, c)
        out.loss.backward()
        assert out.metrics["value_loss"] > 0
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert torch.equal(policy_grad(critic, "separate", 0.0), policy_grad(critic, "separate", 1.0))
    assert not torch.allclose(policy_grad(head, "shared", 0.0), policy_grad(head, "shared", 1.0))


def test_critic_knobs():
    p = TrainConfig(objective="ppo", task="coin").objective_params
    assert (p.critic, p.critic_lr, p.value_weight) == ("separate", None, 1.0)
    assert TrainConfig(objective="ppo", task="coin", critic="shared").objective_params.value_weight == 0.1
    assert TrainConfig(objective="ppo", task="coin", critic="shared", vf_coef=0.5).objective_params.value_weight == 0.5
    with pytest.raises(ValueError, match="critic"):
        TrainConfig(objective="ppo", task="coin", critic="both")
    with pytest.raises(ValueError, match="critic_lr"):
        TrainConfig(objective="grpo", task="coin", critic_lr=1e-3)


# ---------------------------------------------------------------------------------------------
# 5. Expert Iteration: top-p sampling, de-duplication


def test_top_p_filter_matches_transformers():
    from transformers import TopPLogitsWarper

    from posttrain.train.rollout import top_p_filter

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    logits[:8] = (logits[:8] * 2).round() / 2  # ties
    for p in (0.05, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0):
        ours, theirs = top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits)
        assert torch.equal(ours, theirs), p
        assert (ours > -math.inf).sum(-1).min() >= 1
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps {0.5, 0.3} (0.5 alone is < 0.6), renormalised
    # 0.625, 0.375; top_p 0.45 keeps 0.5 alone
    lg = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert torch.allclose(top_p_filter(lg, 0.6).softmax(-1), torch.tensor([[0.0, 0.625, 0.375]]))
    assert torch.allclose(top_p_filter(lg, 0.45).softmax(-1), torch.tensor([[0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError):
        top_p_filter(lg, 0.0)


def test_sampling_with_a_tiny_nucleus_is_greedy(coin_checkpoint):
    from posttrain.train.rollout import generate

    model, tok = load_model(coin_checkpoint)
    prompts = [f"coin {i}:" for i in range(10)]
    greedy = generate(model, tok, prompts, n=1, max_new_tokens=6, greedy=True)
    nucleus = generate(model, tok, prompts, n=3, max_new_tokens=6, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert nucleus.completion_ids == [c for c in greedy.completion_ids for _ in range(3)]
    sampled = generate(model, tok, prompts, n=3, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    assert sampled.completion_ids != nucleus.completion_ids


@pytest.mark.parametrize("dedupe", [True, False])
def test_filtered_source_drops_duplicate_pairs(tiny_checkpoint, monkeypatch, dedupe):
    import posttrain.train.data_sources as ds
    from posttrain.train.rollout import Rollouts

    model, tok = load_model(tiny_checkpoint)
    task = build_task("coin")  # correct: the first letter is in a..m
    problems = [Problem("coin", "id", "coin 3:", {}), Problem("coin", "id", "coin 3:", {}), Problem("coin", "id", "coin 5:", {})]
    texts = ["a", "a", "b", "z",   # prompt 0: correct a, a, b
             "a", "c", "n", "c",   # prompt 1 (the same text as prompt 0): a repeats prompt 0's pair
             "c", "c", "c", "y"]   # prompt 2: correct c three times
    calls = {}

    def fake_generate(model, tok, prompts, n, **kw):
        calls.update(kw, n=n, prompts=prompts)
        return Rollouts([[0]] * len(texts), [[0]] * len(texts), texts, [True] * len(texts), n)

    monkeypatch.setattr(ds, "generate", fake_generate)
    c = TrainConfig(objective="sft", data="filtered", task="coin", steps=1, prompts_per_step=3, samples_per_prompt=2,
                    filter_samples=4, top_p=0.95, dedupe=dedupe, trackers=["none"])
    src = ds.DATA_SOURCES["filtered"].build(c, ds.SourceContext(task, 0, None, [problems], None))
    batch = src.batch(0, problems, c.samples_per_prompt, model, tok, c)
    assert calls["n"] == 4 and calls["top_p"] == 0.95 and len(calls["prompts"]) == 3
    pairs = [(p.prompt, t) for p, t in zip(batch.problems, batch.texts)]
    if dedupe:  # 9 correct, 5 duplicates (a twice and c once of "coin 3:", c twice of "coin 5:"); cap 2 per prompt
        assert pairs == [("coin 3:", "a"), ("coin 3:", "b"), ("coin 3:", "c"), ("coin 5:", "c")]
        assert batch.metrics["filtered/duplicate_frac"] == pytest.approx(5 / 9)
    else:  # duplicates kept, then the cap of 2 per prompt
        assert pairs == [("coin 3:", "a"), ("coin 3:", "a"), ("coin 3:", "a"), ("coin 3:", "c"),
                         ("coin 5:", "c"), ("coin 5:", "c")]
        assert batch.metrics["filtered/duplicate_frac"] == 0.0
    assert batch.metrics["filtered/prompts_solved"] == 1.0 and batch.metrics["filtered/kept"] == len(pairs)
    assert TrainConfig(objective="sft", data="filtered", task="coin").data_params.dedupe is True


def test_ppo_shared_critic_resumes_bitwise(coin_checkpoint, tmp_path):
    """`critic: shared` (value head on the policy trunk, its own lr as a second parameter group)
    cut after its step-2 checkpoint and resumed ends bit-identical, value head included."""
    import json
    import shutil

    from posttrain.train.loop import train

    c = TrainConfig(objective="ppo", critic="shared", critic_lr=3e-3, task="coin", steps=3, prompts_per_step=2,
                    samples_per_prompt=4, max_new_tokens=4, lr=1e-3, checkpoint_every=2, trackers=["none"])
    run = lambda out, resume=False: train(c, init_dir=coin_checkpoint, ref_dir=coin_checkpoint, out_dir=out,  # noqa: E731
                                          task=build_task("coin"), expert_format=None, seed=0, device="cpu", resume=resume)
    full = run(tmp_path / "a")
    cut = tmp_path / "b" / "checkpoints"
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", cut / "step-2")
    assert (cut / "step-2" / "value_head.safetensors").is_file() and not (cut / "step-2" / "critic").exists()
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[:3]))
    resumed = run(tmp_path / "b", resume=True)
    assert json.loads((tmp_path / "b" / "train.json").read_text())["resumed_from_step"] == 2
    for f in ("model/model.safetensors", "value_head.safetensors"):
        x, y = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    strip = lambda p: [{k: v for k, v in json.loads(r).items() if k != "step_seconds"}  # noqa: E731
                       for r in p.read_text().splitlines()]
    assert strip(full.metrics_path) == strip(resumed.metrics_path)
