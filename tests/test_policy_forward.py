"""The log-probabilities every loss uses: `policy_forward` against the definition

    logp[b, t] = log_softmax(logits[b, t]) [input_ids[b, t + 1]]

computed here straight from the model's logits, on a hand-built batch with prompt, completion and
padding, in the padded and in the shared-prefix layout; plus what SFT does with them."""

import copy

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.errors import UserError
from posttrain.models.loading import load_model
from posttrain.train.data_sources import Batch
from posttrain.train.objectives import SFT, PolicyOutputs, Targets
from posttrain.train.policy import Critic, ValueHead, gather_rows, policy_forward
from posttrain.train.sequences import entropy_from_logits, pack

# two groups of two rows: prompts of 3 and 2 tokens, completions of 3, 1, 2, 4 tokens (2 = EOS)
PROMPTS = [[1, 40, 41], [1, 40, 41], [1, 50], [1, 50]]
COMPLETIONS = [[60, 61, 2], [2], [70, 2], [80, 81, 82, 2]]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        # a peaked head: neighbouring positions and tokens get clearly different log-probs, so an
        # off-by-one in the alignment cannot hide in a near-uniform distribution
        m.lm_head.weight.mul_(30.0)
    return m


def reference_logp(model, batch, temperature=1.0):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logits = logits[:, :-1] / temperature
    return torch.log_softmax(logits, -1).gather(2, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1), logits


def test_pack_lays_out_prompt_completion_and_padding_by_hand():
    b = pack(PROMPTS, COMPLETIONS, pad_id=0)
    assert b.input_ids.tolist() == [[1, 40, 41, 60, 61, 2], [1, 40, 41, 2, 0, 0],
                                    [1, 50, 70, 2, 0, 0], [1, 50, 80, 81, 82, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    # entry t scores token t + 1: the first completion token is predicted from the last prompt token
    assert b.target_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0],
                                      [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert b.shared is None
    # truncation from the right keeps the prompt and cuts the completion
    t = pack([[1, 40, 41]], [[60, 61, 62, 2]], pad_id=0, max_length=5)
    assert t.input_ids.tolist() == [[1, 40, 41, 60, 61]] and t.target_mask.tolist() == [[0, 0, 1, 1]]


@pytest.mark.parametrize("group_size", [1, 2])
def test_policy_forward_scores_token_t_plus_1_at_position_t(model, group_size):
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, group_size=group_size)
    assert (batch.shared is not None) == (group_size == 2)
    ref, _ = reference_logp(model, batch.padded())
    with torch.no_grad():
        out = policy_forward(model, batch)
    assert out.logp.shape == batch.target_mask.shape == (4, 5)
    assert out.entropy is None and out.values is None
    m = batch.target_mask.bool()
    assert torch.allclose(out.logp[m], ref[m], atol=1e-5)
    # the padded layout computes every real position like the definition, prompt included
    if group_size == 1:
        real = batch.attention_mask[:, 1:].bool()
        assert torch.allclose(out.logp[real], ref[real], atol=1e-6)
    # and the log-probs are far from uniform, so the comparison above has teeth
    assert ref[m].std() > 0.5


def test_temperature_divides_the_logits(model):
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, group_size=2)
    ref, logits = reference_logp(model, batch.padded(), temperature=2.0)
    with torch.no_grad():
        out = policy_forward(model, batch, temperature=2.0, entropy=True)
        plain = policy_forward(model, batch, temperature=1.0).logp
    m = batch.target_mask.bool()
    assert torch.allclose(out.logp[m], ref[m], atol=1e-5)
    assert not torch.allclose(out.logp[m], plain[m], atol=1e-2)
    p = torch.softmax(logits, -1)
    assert torch.allclose(out.entropy[m], -(p * p.log()).sum(-1)[m], atol=1e-4)


def test_entropy_from_logits_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]]))
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([1.5 * 0.6931472, 0.0]), atol=1e-6)


def test_value_head_reads_the_hidden_state_of_position_t(model):
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, group_size=2)
    head = ValueHead(model.config.hidden_size)
    torch.manual_seed(0)
    with torch.no_grad():
        head.proj.weight.normal_()
        head.proj.bias.fill_(0.5)
        out = policy_forward(model, batch, value_head=head)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    expect = hidden[:, :-1] @ head.proj.weight[0] + 0.5
    m = batch.target_mask.bool()
    assert out.values.shape == (4, 5)
    assert torch.allclose(out.values[m], expect[m], atol=1e-4)
    ref, _ = reference_logp(model, batch.padded())
    assert torch.allclose(out.logp[m], ref[m], atol=1e-5)
    assert torch.equal(ValueHead(8)(torch.randn(2, 3, 8)), torch.zeros(2, 3))  # zero-initialised critic


def test_value_head_saves_and_loads(tmp_path):
    head = ValueHead(4)
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    head.save(tmp_path / "v.safetensors")
    other = ValueHead(4)
    other.load(tmp_path / "v.safetensors")
    assert torch.equal(other.proj.weight, head.proj.weight)


def _sft_batch():
    packed = pack([[1, 40, 41, 42]], [[60, 61, 62, 2]], pad_id=0)
    return Batch(packed, 1, [None], [""])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sft_loss_ignores_the_prompt_tokens(model, agg):
    batch = _sft_batch()
    cfg = TrainConfig(objective="sft", task="points24", loss_agg=agg, trackers=["none"])
    with torch.no_grad():
        logp = policy_forward(model, batch.packed).logp
    prompt_pos = batch.packed.target_mask == 0
    assert prompt_pos.tolist() == [[True, True, True, False, False, False, False]]
    new = logp.clone().requires_grad_(True)
    loss = SFT().compute(PolicyOutputs(new), PolicyOutputs(logp), None, batch, Targets(), cfg).loss
    (g,) = torch.autograd.grad(loss, new)
    assert torch.equal(g[prompt_pos], torch.zeros(3)) and bool((g[~prompt_pos] < 0).all())
    # moving the prompt tokens' log-probs leaves the loss exactly as it was
    moved = logp + 5.0 * prompt_pos
    again = SFT().compute(PolicyOutputs(moved), PolicyOutputs(moved), None, batch, Targets(), cfg).loss
    assert again.item() == loss.item()
    # the NLL by the definition: minus the mean completion log-prob (one row: both means agree), or
    # for Dr. GRPO's sum-norm minus their sum over B * max_new_tokens = 1 * 32 (the budget, not the width)
    if agg == "seq-mean-token-sum-norm":
        assert cfg.max_new_tokens == 32
        assert loss.item() == pytest.approx(-logp[~prompt_pos].sum().item() / 32, rel=1e-6)
    else:
        assert loss.item() == pytest.approx(-logp[~prompt_pos].mean().item(), rel=1e-6)


def test_a_few_sft_steps_lower_the_loss_on_a_fixed_example(model):
    batch = _sft_batch()
    cfg = TrainConfig(objective="sft", task="points24", trackers=["none"])
    m = copy.deepcopy(model)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        out = SFT().compute(policy_forward(m, batch.packed), None, None, batch, Targets(), cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))


def _random_critic(tiny_checkpoint, seed):
    critic = Critic.from_checkpoint(tiny_checkpoint)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        critic.head.proj.weight.normal_(generator=g)
        critic.head.proj.bias.fill_(-0.25)
    return critic


@pytest.mark.parametrize("group_size", [1, 2])
def test_separate_critic_values_are_its_trunks_hidden_state_at_position_t(tiny_checkpoint, group_size):
    base, _ = load_model(tiny_checkpoint)
    critic = _random_critic(tiny_checkpoint, 0)
    # a trainable copy of the init's trunk (load_model hands back a frozen model), with its own weights
    assert all(p.requires_grad for p in critic.trunk.parameters())
    assert critic.trunk is not base.base_model
    assert critic.head.proj.weight.shape == (1, base.config.hidden_size)
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, group_size=group_size)
    with torch.no_grad():
        values = critic(batch)
        hidden = base.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    expect = hidden[:, :-1] @ critic.head.proj.weight[0] - 0.25
    assert values.shape == batch.target_mask.shape == (4, 5)
    m = batch.target_mask.bool()
    assert torch.allclose(values[m], expect[m], atol=1e-4)
    assert expect[m].std() > 0.1  # the values differ from position to position: the alignment is checked


def test_separate_critic_saves_and_loads(tiny_checkpoint, tmp_path):
    critic = _random_critic(tiny_checkpoint, 1)
    with torch.no_grad():
        next(critic.trunk.parameters()).add_(0.5)  # a trained trunk differs from the init's
    assert critic.save(tmp_path / "critic") == tmp_path / "critic"
    assert (tmp_path / "critic" / "value_head.safetensors").is_file()
    assert (tmp_path / "critic" / "model.safetensors").is_file()  # safetensors, not a pickle
    other = _random_critic(tiny_checkpoint, 2)
    other.load(str(tmp_path / "critic"))
    for (name, a), (_, b) in zip(critic.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0)
    with torch.no_grad():
        assert torch.equal(critic(batch), other(batch))
    with pytest.raises(UserError, match=r"^\S*nothing: no critic here \(expected the trunk and value_head.safetensors\)$"):
        other.load(tmp_path / "nothing")


def _model_inputs(model, batch, **kw):
    """The keyword arguments the model's forward received in one `policy_forward` call."""
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            policy_forward(model, batch, **kw)
    finally:
        hook.remove()
    return seen


def test_the_model_sees_the_shared_layout_or_the_padded_batch_with_its_mask(model):
    padded = pack(PROMPTS, COMPLETIONS, pad_id=0)
    (kw,) = _model_inputs(model, padded)
    assert set(kw) >= {"input_ids", "attention_mask"}
    assert torch.equal(kw["input_ids"], padded.input_ids) and torch.equal(kw["attention_mask"], padded.attention_mask)
    # grouped: each prompt once, [prompt, c_1, c_2] per group, with its 4-D mask and positions
    shared = pack(PROMPTS, COMPLETIONS, pad_id=0, group_size=2)
    (kw,) = _model_inputs(model, shared)
    sh = shared.shared
    assert kw["input_ids"].shape[0] == 2 and torch.equal(kw["input_ids"], sh.input_ids)
    assert torch.equal(kw["attention_mask"], sh.attention_mask) and torch.equal(kw["position_ids"], sh.position_ids)


def _row_grad_norm(model, logp, rows):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logp[rows].sum(), params, allow_unused=True, retain_graph=True)
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def test_grad_groups_compute_the_other_groups_without_autograd(model):
    temperature = 2.0  # passed on to both parts
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, group_size=2)
    m = batch.target_mask.bool()
    ref, _ = reference_logp(model, batch.padded(), temperature=temperature)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for groups in ([1], [0], [0, 1], []):
            out = policy_forward(model, batch, temperature, grad_groups=groups)
            assert out.logp.shape == (4, 5) and out.entropy is None and out.values is None
            assert torch.allclose(out.logp[m], ref[m], atol=1e-5)
            if not groups:
                assert not out.logp.requires_grad
                continue
            live = batch.group_rows(groups)
            dead = [r for r in range(4) if r not in live]
            assert _row_grad_norm(model, out.logp, live) > 0
            if dead:
                assert _row_grad_norm(model, out.logp, dead) == 0.0
        # without autograd nothing carries a gradient, the live groups included
        with torch.no_grad():
            assert not policy_forward(model, batch, temperature, grad_groups=[1]).logp.requires_grad
        # grad_groups only applies to plain log-probs of a grouped batch: with entropy, a value head or a
        # padded batch every row keeps its gradient
        head = ValueHead(model.config.hidden_size)
        for batch_, kw in ((batch, dict(entropy=True)), (batch, dict(value_head=head)),
                           (pack(PROMPTS, COMPLETIONS, pad_id=0), {})):
            out = policy_forward(model, batch_, temperature, grad_groups=[1], **kw)
            assert _row_grad_norm(model, out.logp, [0, 1]) > 0
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def test_gather_rows_backward_sums_repeated_rows_without_index_put_on_cpu(monkeypatch):
    # on CPU, index_put_(accumulate=True) (autograd's own backward of x[index]) adds with atomics at
    # more than one thread, so its bits vary from run to run; the backward must use index_add_
    def refuse(*args, **kwargs):
        raise AssertionError("index_put_ on CPU")

    monkeypatch.setattr(torch.Tensor, "index_put_", refuse)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    index = torch.tensor([[0, 2, 0], [0, 0, 1]])
    y = gather_rows(x, index)
    assert torch.equal(y, x.detach()[index])
    upstream = torch.arange(12.0).reshape(2, 3, 2)
    (y * upstream).sum().backward()
    # row 0 is read at (0,0), (0,2), (1,0), (1,1): 0+4+6+8 = 18, 1+5+7+9 = 22
    assert x.grad.tolist() == [[18.0, 22.0], [10.0, 11.0], [2.0, 3.0]]
