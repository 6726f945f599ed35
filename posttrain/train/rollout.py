"""Batched sampling with a KV cache, for rollouts and evaluation.

Each distinct prompt is encoded (prefilled) once; for group sampling its cache is then expanded
`n` times, so a GRPO group of 8 costs one prefill, not eight. Prompts are left-padded with explicit
position ids, and rows that have emitted EOS are dropped from the batch (cache rows included) so
the tail of a batch does not pay for finished sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, TopPLogitsWarper

from posttrain.train.sequences import encode_prompts


@dataclass
class Rollouts:
    """Completions for a list of prompts, `n` per prompt, in prompt-major order."""

    prompt_ids: list[list[int]]  # per completion (repeated n times per prompt)
    completion_ids: list[list[int]]  # sampled tokens, EOS included when finished
    texts: list[str]  # decoded completion without EOS
    finished: list[bool]  # False when max_new_tokens was hit before EOS
    n: int


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus (top-p) filtering of [N, V] logits (Holtzman et al., 2020) by transformers'
    `TopPLogitsWarper` (min_tokens_to_keep=1): the smallest set of most probable tokens whose mass
    is >= top_p keeps its logits, every other token gets -inf; top_p = 1 keeps every token."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    if top_p == 1.0:
        return logits
    return TopPLogitsWarper(top_p)(None, logits)


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[str],
    n: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    top_p: float = 1.0,
    shard: tuple[int, int] | None = None,
) -> Rollouts:
    """Sample `n` completions per prompt (greedy decoding when `greedy`); batches of at most
    `batch_size` completions, each batch holding whole prompt groups. Sampling divides the logits
    by `temperature`, then keeps the `top_p` nucleus (`top_p_filter`; 1.0: off), in the order of
    transformers' warpers.

    `shard = (offset, total)`: `prompts` are the block starting at prompt `offset` of a global list
    of `total` prompts sampled by several processes together (`train.distributed`); every process
    calls `generate` with the same generator state, and each row gets exactly the sample it would
    get if one process sampled all `total` prompts (see `_sample`)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    prompt_ids = encode_prompts(tok, prompts)
    engine = getattr(model, "_posttrain_rollout_engine", None)  # a training run's vLLM engine (train.vllm_rollout)
    if engine is not None:
        seed = int(generator.initial_seed()) % 2**31 if generator is not None else 0
        out_completions, out_finished = engine.generate(prompt_ids, n, max_new_tokens, temperature, greedy, seed,
                                                        top_p, tok.eos_token_id)
        return _rollouts(tok, prompt_ids, out_completions, out_finished, n)
    per_batch = max(1, batch_size // n)
    out_completions: list[list[int]] = []
    out_finished: list[bool] = []
    if shard is None:
        for start in range(0, len(prompts), per_batch):
            comp, fin = _generate_batch(
                model, tok, prompt_ids[start : start + per_batch], n, max_new_tokens, temperature, greedy, generator, top_p
            )
            out_completions += comp
            out_finished += fin
    else:
        offset, total = shard
        for start in range(0, total, per_batch):  # the chunks one process would sample, in order
            lo, hi = max(start, offset), min(start + per_batch, total, offset + len(prompts))
            rows = (max(hi - lo, 0) * n, (lo - start) * n, (min(start + per_batch, total) - start) * n)
            comp, fin = _generate_batch(model, tok, prompt_ids[lo - offset : hi - offset] if hi > lo else [], n,
                                        max_new_tokens, temperature, greedy, generator, top_p, rows)
            out_completions += comp
            out_finished += fin
    return _rollouts(tok, prompt_ids, out_completions, out_finished, n)


def _rollouts(tok, prompt_ids, out_completions, out_finished, n) -> Rollouts:
    eos = tok.eos_token_id
    texts = tok.batch_decode([[t for t in c if t != eos] for c in out_completions], skip_special_tokens=False)
    expanded = [p for p in prompt_ids for _ in range(n)]
    return Rollouts(expanded, out_completions, texts, out_finished, n)


def _takes_bool_mask(model) -> bool:
    """Whether every layer of `model` is full causal attention through sdpa, which reads a boolean
    [batch, 1, query, key] mask as is. Eager attention wants an additive float mask, and sliding or
    chunked windows need transformers' own masks: those keep the 2-D mask."""
    text = model.config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    windowed = any(getattr(text, a, None) is not None for a in ("sliding_window", "attention_chunk_size"))
    return getattr(model.config, "_attn_implementation", None) == "sdpa" and kinds == {"full_attention"} and not windowed


def _sample(probs: torch.Tensor, generator, glob: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One token per row of `probs` [N, V].

    One process on the CPU: `torch.multinomial`. Elsewhere, the same draw written out: for one
    sample, `torch.multinomial` on CPU is argmax(p / q) with q ~ Exp(1) filled into a tensor shaped
    like the probabilities (aten/src/ATen/native/Distributions.cpp, the "gumbel softmax" fast path).
    Several processes (`glob` = (bool mask of the global rows still sampling, global index of each
    local row)): each process fills q for all rows still sampling in every process, as one process
    would, and keeps its own rows: the same generator state gives the same sample to a row wherever
    it runs (`tests/test_distributed.py` checks the identity with `torch.multinomial`).
    """
    if glob is None:
        if probs.device.type == "cpu":
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return (probs / exp_noise(probs.shape[0], probs.shape[1], probs.device, generator)).argmax(-1)
    alive, mine = glob
    q = exp_noise(int(alive.sum()), probs.shape[-1], probs.device, generator)
    pos = (alive.cumsum(0) - 1)[mine]
    return (probs / q[pos.to(q.device)]).argmax(-1)


def exp_noise(rows: int, vocab: int, device: torch.device, generator) -> torch.Tensor:
    """Exp(1) noise [rows, vocab] (float32) of one token step, made where the probabilities are.

    On the CPU it is filled from `generator` itself. On an accelerator it is filled there by a
    generator of that device seeded from one draw of `generator` (`device_generator`): filling
    rows x vocab exponentials on the CPU and moving the probabilities there took 0.42 s per token
    step at Qwen2.5's 152k vocabulary on an H200 (bench/gpu_check.py's profile), 20x the model's
    forward. The CPU `generator` stays the one state that checkpoints carry, so resume is exact on
    either device; an accelerator's samples differ from the CPU's, as its floats already do."""
    device = torch.device(device)
    g = generator if device.type == "cpu" else device_generator(generator, device)
    return torch.empty((rows, vocab), device=device).exponential_(1, generator=g)


def device_generator(generator: torch.Generator, device) -> torch.Generator:
    """A generator on `device` seeded from one 63-bit draw of the CPU `generator` (which advances
    by that one draw)."""
    seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _next_tokens(logits, greedy, temperature, top_p, generator, glob=None) -> torch.Tensor:
    """The next token of every row: argmax, or a draw from the temperature- and nucleus-warped
    distribution (`_sample`; `glob` for several processes)."""
    if greedy:
        return logits.argmax(-1)
    scaled = logits / temperature
    probs = torch.softmax(scaled if top_p >= 1.0 else top_p_filter(scaled, top_p), dim=-1)
    return _sample(probs, generator, glob)


def _generate_batch(model, tok, prompt_ids, n, max_new_tokens, temperature, greedy, generator, top_p=1.0, rows=None):
    """`rows` (several processes): (local rows, their first global row, global rows) of this chunk."""
    if rows is not None:
        return _generate_shard(model, tok, prompt_ids, n, max_new_tokens, temperature, greedy, generator, top_p, rows)
    state = _prefill(model, tok, prompt_ids, n)
    total = state["logits"].shape[0]
    tokens = torch.full((total, max_new_tokens), tok.pad_token_id, dtype=torch.long)
    lengths = torch.zeros(total, dtype=torch.long)
    finished = torch.zeros(total, dtype=torch.bool)
    alive = torch.arange(total)  # original row of each row still in the batch
    for step in range(max_new_tokens):
        logits = state["logits"]
        nxt = _next_tokens(logits, greedy, temperature, top_p, generator).to(logits.device)
        nxt_cpu = nxt.cpu()
        tokens[alive, step] = nxt_cpu
        lengths[alive] = step + 1
        done = nxt_cpu == tok.eos_token_id
        finished[alive[done]] = True
        if step == max_new_tokens - 1:
            break
        keep = ~done
        if not keep.any():
            break
        alive = alive[keep]
        _decode_step(model, state, nxt, keep)
    return [tokens[i, : lengths[i]].tolist() for i in range(total)], finished.tolist()


def _generate_shard(model, tok, prompt_ids, n, max_new_tokens, temperature, greedy, generator, top_p, rows):
    """`_generate_batch` for this process's rows of a chunk sampled by several processes: every
    process takes every token step until all rows of all processes are finished, drawing the
    chunk's noise each step (`_sample`), and skips the model when its own rows are done."""
    from posttrain.train.distributed import global_done

    n_local, first, n_global = rows
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    if n_local:
        state = _prefill(model, tok, prompt_ids, n)
    g_alive = torch.ones(n_global, dtype=torch.bool)
    mine = torch.arange(first, first + n_local)  # global row of each local row still sampling
    tokens = torch.full((n_local, max_new_tokens), tok.pad_token_id, dtype=torch.long)
    lengths = torch.zeros(n_local, dtype=torch.long)
    finished = torch.zeros(n_local, dtype=torch.bool)
    alive = torch.arange(n_local)
    for step in range(max_new_tokens):
        if len(alive):
            nxt = _next_tokens(state["logits"], greedy, temperature, top_p, generator, (g_alive, mine)).cpu()
        else:
            nxt = torch.zeros(0, dtype=torch.long)
            if not greedy:  # the other processes' rows draw from the same stream
                exp_noise(int(g_alive.sum()), vocab, device, generator)
        tokens[alive, step] = nxt
        lengths[alive] = step + 1
        done = nxt == tok.eos_token_id
        finished[alive[done]] = True
        g_done = torch.zeros(n_global, dtype=torch.bool)
        g_done[mine[done]] = True
        g_alive &= ~global_done(g_done)
        if step == max_new_tokens - 1 or not g_alive.any():
            break
        keep = ~done
        alive, mine = alive[keep], mine[keep]
        if len(alive):
            _decode_step(model, state, nxt.to(state["logits"].device), keep)
    return [tokens[i, : lengths[i]].tolist() for i in range(n_local)], finished.tolist()


def _prefill(model, tok, prompt_ids, n) -> dict:
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        attention = attention.repeat_interleave(n, 0)
        positions = positions.repeat_interleave(n, 0)
    return {"cache": cache, "logits": logits, "attention": attention, "next_pos": positions[:, -1:] + 1,
            "fast_mask": _takes_bool_mask(model)}


def _decode_step(model, state: dict, nxt: torch.Tensor, keep: torch.Tensor) -> None:
    device = state["logits"].device
    attention, next_pos = state["attention"], state["next_pos"]
    if not keep.all():
        idx = keep.nonzero().squeeze(-1).to(device)
        state["cache"].batch_select_indices(idx)
        nxt, attention, next_pos = nxt[idx], attention[idx], next_pos[idx]
    attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    out = model(input_ids=nxt.unsqueeze(-1),
                attention_mask=attention.bool()[:, None, None, :] if state["fast_mask"] else attention,
                position_ids=next_pos, past_key_values=state["cache"], use_cache=True)
    state.update(logits=out.logits[:, -1].float(), attention=attention, next_pos=next_pos + 1)
