"""Tiny from-scratch causal LMs and their character tokenizer.

The models are ordinary Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` instances and the
tokenizer is a `PreTrainedTokenizerFast`, so a tiny checkpoint is saved, reloaded, diffed and
repaired through exactly the code path that serves real checkpoints.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from posttrain.config import ModelConfig

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARS = string.printable[:95]  # digits, letters, punctuation and space: everything the tasks write


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character plus <pad>, <bos>, <eos> (ids 0, 1, 2)."""
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right", model_max_length=4096
    )


def build_tiny_model(cfg: ModelConfig, vocab_size: int, seed: int) -> torch.nn.Module:
    """A randomly initialised Llama- or Qwen2-architecture model; initialisation is seeded."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    if cfg.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))


# Qwen2.5-Instruct's template with a space where it writes a newline (the character tokenizer has none)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def build_chat_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer of an instruct model: Qwen's <|im_start|>/<|im_end|> turn markers as
    special tokens (ids len(char tokenizer) and +1), <|im_end|> as EOS and a chat template. Tests and
    the GPU check stand it in for a hub instruct model's tokenizer, offline."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok
