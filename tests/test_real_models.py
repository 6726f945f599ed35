"""Real-model features on tiny local stand-ins: chat templates, LoRA, the rollout backend choice."""

from pathlib import Path

import pytest
import torch

from posttrain.config import ModelConfig, load_study_config, preset_path
from posttrain.models.loading import load_model, save_checkpoint
from posttrain.models.tiny import build_char_tokenizer, build_chat_tokenizer, build_tiny_model
from posttrain.train.sequences import encode_completions, encode_prompts

TINY = ModelConfig(arch="qwen2", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_length=128)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 'instruct' model: random weights, a tokenizer with a chat template."""
    tok = build_chat_tokenizer()
    model = build_tiny_model(TINY, len(tok), seed=0)
    model.config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("chat") / "instruct"
    save_checkpoint(model, tok, path)
    return path


def test_chat_prompts_are_apply_chat_template_ids(chat_checkpoint):
    _, tok = load_model(chat_checkpoint)
    prompts = ["What is 2 plus 3?", "Make 24 from 1 2 3 4."]
    want = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)
            for p in prompts]
    want = [w["input_ids"] if not isinstance(w, list) else w for w in want]
    got = encode_prompts(tok, prompts)
    assert got == want
    start, gen = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert got[0][0] == start and got[0].count(gen) == 1  # one user turn, then the assistant header
    assert tok.decode(got[0]).endswith("<|im_start|>assistant ")
    # none: the prompt as it is, after BOS
    _, plain = load_model(chat_checkpoint, chat_template="none")
    assert encode_prompts(plain, prompts) == [[plain.bos_token_id, *plain(p, add_special_tokens=False)["input_ids"]]
                                              for p in prompts]


def test_chat_mode_is_not_saved_with_the_tokenizer(chat_checkpoint, tmp_path):
    model, tok = load_model(chat_checkpoint, chat_template="none")
    save_checkpoint(model, tok, tmp_path / "again")
    _, again = load_model(tmp_path / "again")
    assert again.chat_template and encode_prompts(again, ["x"]) == encode_prompts(load_model(chat_checkpoint)[1], ["x"])


def test_sft_scores_only_the_completion_under_a_chat_template(chat_checkpoint):
    from posttrain.tasks import build_task
    from posttrain.train.data_sources import ExpertSource

    _, tok = load_model(chat_checkpoint)
    task = build_task("arith")
    import random

    problems = [task.sample(random.Random(i), "id") for i in range(3)]
    fmt = task.solution_formats[0]
    batch = ExpertSource(task, fmt, seed=0, max_length=None).batch(0, problems, 1, None, tok, None)
    prompt_ids = encode_prompts(tok, [p.prompt for p in problems])
    for i, p in enumerate(problems):
        ids = batch.packed.input_ids[i]
        n = int(batch.packed.attention_mask[i].sum())
        targets = ids[1:][batch.packed.target_mask[i].bool()].tolist()
        assert ids[: len(prompt_ids[i])].tolist() == prompt_ids[i]  # the templated prompt is the context
        assert targets == encode_completions(tok, [task.solve(p, fmt)])[0]  # scored: completion + <|im_end|>
        assert targets[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(prompt_ids[i]) + len(targets) == n


def test_tiny_world_prompts_are_byte_identical_under_auto():
    tok = build_char_tokenizer()
    assert not tok.chat_template
    cfg = load_study_config(preset_path("default"))
    assert cfg.chat_template == "auto" and cfg.base_model is None
    from posttrain.tasks import build_task
    import random

    task = build_task("points24")
    prompts = [task.sample(random.Random(i), "id").prompt for i in range(5)]
    assert encode_prompts(tok, prompts) == [[tok.bos_token_id, *[tok.convert_tokens_to_ids(c) for c in p]] for p in prompts]


def test_chat_template_config_is_checked():
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="chat_template"):
        load_study_config(preset_path("quick"), ["chat_template=always"])


def test_char_tokenizer_of_a_qwen2_checkpoint_keeps_spaces(chat_checkpoint):
    # transformers 5 would read it as Qwen2Tokenizer (model type) and drop the spaces
    _, tok = load_model(chat_checkpoint)
    ids = tok("a b", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and tok.decode(ids) == "a b" and len(tok) == len(build_chat_tokenizer())
