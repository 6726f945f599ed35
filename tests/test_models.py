import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.models.loading import load_model, save_checkpoint
from posttrain.models.tiny import build_char_tokenizer, build_tiny_model
from posttrain.train.rollout import generate
from posttrain.train.policy import policy_forward
from posttrain.train.sequences import encode_completions, encode_prompts, pack


def test_char_tokenizer_round_trip():
    tok = build_char_tokenizer()
    text = "pts K 3 10 J JQK=11,12,13 t24:(10-4)*(2+2)=24"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_save_reload_round_trip(tmp_path):
    for arch in ("llama", "qwen2"):
        tok = build_char_tokenizer()
        model = build_tiny_model(ModelConfig(arch=arch, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2),
                                 len(tok), seed=3).eval()
        save_checkpoint(model, tok, tmp_path / arch)
        assert (tmp_path / arch / "model.safetensors").is_file()
        model2, tok2 = load_model(tmp_path / arch)
        assert type(model2) is type(model)
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
        x = torch.tensor([tok("fact color of zubo:")["input_ids"]])
        with torch.no_grad():
            assert torch.equal(model(x).logits, model2(x).logits)
        assert tok2.decode(tok2("a+b=c")["input_ids"]) == "a+b=c"


def test_save_is_atomic_over_existing_dir(tmp_path, tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint)
    target = tmp_path / "ck"
    save_checkpoint(model, tok, target)
    (target / "marker").write_text("old")
    save_checkpoint(model, tok, target)  # replaces the whole directory
    assert not (target / "marker").exists() and (target / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_sampler_matches_hf_generate_greedy(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint)
    prompts = ["pts K 3 5 2 JQK=10 t24:", "fact color of zubo:", "arith 1+2:"]  # different lengths: left padding
    ro = generate(model, tok, prompts, n=2, max_new_tokens=12, greedy=True)
    assert ro.completion_ids[0] == ro.completion_ids[1]  # greedy copies agree
    for i, p in enumerate(encode_prompts(tok, prompts)):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert ro.completion_ids[2 * i] == ref[: len(ro.completion_ids[2 * i])]


def test_sampling_is_seeded_and_groups_expand(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint)
    a = generate(model, tok, ["arith 1+2:", "str rev ab:"], n=4, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    b = generate(model, tok, ["arith 1+2:", "str rev ab:"], n=4, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    assert a.texts == b.texts and len(a.texts) == 8
    assert a.prompt_ids[0] == a.prompt_ids[3] != a.prompt_ids[4]


def test_sampler_logprobs_match_training_forward(tiny_checkpoint):
    """Completions sampled with the KV cache (left padding) score the same in the right-padded
    training forward: the two code paths agree on the model's distribution."""
    model, tok = load_model(tiny_checkpoint)
    ro = generate(model, tok, ["arith 1+2:", "pts K 3 5 2 JQK=10 t24:"], n=1, max_new_tokens=6, greedy=True)
    batch = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        logp = policy_forward(model, batch).logp
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    # greedy tokens are the argmax of the training-forward logits at every completion position
    m = batch.target_mask.bool()
    assert torch.equal(logits.argmax(-1)[m], batch.input_ids[:, 1:][m])
    assert torch.all(logp[m] <= 0)


def test_pack_marks_completion_targets():
    batch = pack([[1, 5, 6]], [[7, 8, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 2]]
    # targets are tokens 3..5 (7, 8, eos), predicted at positions 2..4
    assert batch.target_mask.tolist() == [[0, 0, 1, 1, 1]]
    tok = build_char_tokenizer()
    assert encode_completions(tok, ["ab"]) == [[tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), 2]]


def test_shared_prefix_layout_hand_checked():
    # two groups of two: prompts [1, 5] and [1, 6]; completions of lengths 2, 1, 1, 3
    b = pack([[1, 5], [1, 5], [1, 6], [1, 6]], [[7, 2], [2], [8], [9, 9, 2]], pad_id=0, group_size=2)
    sh = b.shared
    assert sh.input_ids.tolist() == [[1, 5, 7, 2, 2, 0], [1, 6, 8, 9, 9, 2]]
    assert sh.position_ids[1].tolist() == [0, 1, 2, 2, 3, 4]  # each completion continues the prompt
    m = sh.attention_mask[1, 0].int()
    # the second completion (layout 3..5) sees the prompt and itself, never the first completion
    assert m[4].tolist() == [1, 1, 0, 1, 1, 0] and m[2].tolist() == [1, 1, 1, 0, 0, 0]
    # padded row 3 = [1, 6, 9, 9, 2]: token t sits at flat index 6 + (0, 1, 3, 4, 5)
    assert sh.index[3].tolist() == [6, 7, 9, 10, 11]
    # different prompts inside a group: no shared layout
    assert pack([[1, 5], [1, 6]], [[2], [2]], pad_id=0, group_size=2).shared is None


def test_select_groups_is_pack_of_those_rows():
    """A subset of prompt groups cut from a packed batch equals packing those rows alone, tensor
    for tensor (the update's zero-advantage split relies on it)."""
    g = torch.Generator().manual_seed(3)
    prompts, comps = [], []
    for k in range(5):
        p = torch.randint(3, 50, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(3):
            prompts.append(p)
            comps.append(torch.randint(3, 50, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist())
    full = pack(prompts, comps, pad_id=0, group_size=3)
    for groups in ([0], [1, 3], [4, 0, 2], [0, 1, 2, 3, 4]):
        rows = full.group_rows(groups)
        assert rows == [3 * k + i for k in groups for i in range(3)]
        got, want = full.select_groups(groups), pack([prompts[r] for r in rows], [comps[r] for r in rows], 0, group_size=3)
        for name in ("input_ids", "attention_mask", "target_mask"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        for name in ("input_ids", "position_ids", "attention_mask", "index"):
            assert torch.equal(getattr(got.shared, name), getattr(want.shared, name)), name


def test_shared_prefix_forward_matches_padded_rows(tiny_checkpoint):
    from posttrain.train.policy import ValueHead

    model, tok = load_model(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    ro = generate(model, tok, ["pts K 3 5 2 JQK=10 t24:", "arith 7+5-3:"], n=4, max_new_tokens=12, temperature=1.0, generator=g)
    batch = pack(ro.prompt_ids, ro.completion_ids, tok.pad_token_id, group_size=4)
    assert batch.shared is not None and batch.shared.input_ids.shape[0] == 2
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.proj.weight, generator=g)
    with torch.no_grad():
        a = policy_forward(model, batch, entropy=True, value_head=head)
        b = policy_forward(model, batch.padded(), entropy=True, value_head=head)
    m = batch.target_mask.bool()
    for x, y in ((a.logp, b.logp), (a.entropy, b.entropy), (a.values, b.values)):
        assert x.shape == y.shape and torch.allclose(x[m], y[m], atol=1e-5)
    # gradients flow through the shared layout as through the padded one
    la = (policy_forward(model, batch).logp * batch.target_mask).sum()
    ga = torch.autograd.grad(la, model.model.embed_tokens.weight)[0]
    lb = (policy_forward(model, batch.padded()).logp * batch.target_mask).sum()
    gb = torch.autograd.grad(lb, model.model.embed_tokens.weight)[0]
    assert torch.allclose(ga, gb, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2-gqa"])
def test_decode_mask_shortcut_samples_what_transformers_mask_samples(tiny_checkpoint, monkeypatch, arch):
    """The sampler hands sdpa its own 4-D padding mask at decode steps; with left padding of
    different widths it must draw exactly what transformers' own mask construction draws."""
    import posttrain.train.rollout as rollout

    if arch == "llama":
        model, tok = load_model(tiny_checkpoint)
    else:  # grouped-query attention and tied embeddings
        tok = build_char_tokenizer()
        model = build_tiny_model(ModelConfig(arch="qwen2", hidden_size=32, intermediate_size=48, num_layers=2,
                                             num_heads=4, num_kv_heads=2, tie_embeddings=True), len(tok), seed=1).eval()
    assert rollout._takes_bool_mask(model)  # the shortcut is live for this model
    prompts = ["pts K 3 5 2 JQK=10 t24:", "a:", "fact color of zubo:"]

    def draw():
        sampled = generate(model, tok, prompts, n=4, max_new_tokens=16, generator=torch.Generator().manual_seed(11))
        greedy = generate(model, tok, prompts, n=1, max_new_tokens=16, greedy=True)
        return sampled.completion_ids, sampled.finished, greedy.completion_ids

    fast = draw()
    monkeypatch.setattr(rollout, "_takes_bool_mask", lambda m: False)
    assert draw() == fast
    model.config._attn_implementation = "eager"  # eager wants an additive mask: no shortcut
    monkeypatch.undo()
    assert not rollout._takes_bool_mask(model)


def test_a_character_the_tiny_tokenizer_lacks_is_a_user_error():
    from posttrain.errors import UserError

    tok = build_char_tokenizer()
    assert encode_prompts(tok, ["ab"]) == [[tok.bos_token_id, *tok("ab", add_special_tokens=False)["input_ids"]]]
    with pytest.raises(UserError, match=r"cannot encode '\\n', 'é' in the prompt") as e:
        encode_prompts(tok, ["fine", "line\nbreak é"])
    assert "\n" not in str(e.value).replace("\\n", "")
    with pytest.raises(UserError, match="in the completion"):
        encode_completions(tok, ["tab\there"])
