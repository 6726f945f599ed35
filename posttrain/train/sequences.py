"""Token-level plumbing shared by pretraining, post-training and evaluation.

Sequences are laid out as ``<bos> prompt completion <eos>`` and right-padded; `completion_mask`
marks the target positions that belong to the completion, already shifted so that entry ``t``
refers to the prediction of token ``t + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def encode_prompts(tok, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, prefixed with BOS when the tokenizer has one."""
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        ids = [[tok.bos_token_id, *x] for x in ids]
    return ids


def encode_completions(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each completion text followed by EOS."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [[*x, tok.eos_token_id] for x in ids]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T-1] float: 1 where token t+1 is a completion token

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, max_length: int | None = None) -> PackedBatch:
    """Concatenate prompt and completion per row and right-pad; truncate from the right if needed."""
    rows = []
    starts = []
    for p, c in zip(prompt_ids, completion_ids):
        seq = list(p) + list(c)
        if max_length is not None:
            seq = seq[:max_length]
        rows.append(seq)
        starts.append(min(len(p), len(seq)))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (row, start) in enumerate(zip(rows, starts)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        # token j (j >= start) is a completion token; it is predicted at position j - 1
        target[i, max(start - 1, 0) : len(row) - 1] = 1.0
    return PackedBatch(input_ids, attention, target)


def token_logprobs(model, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) for every position t, shape [B, T-1] (garbage where masked)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, 1:]
    # log_softmax + gather without materialising a second [B, T, V] tensor of log-probs
    return torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class PackedDocs:
    """Several documents per row: block-diagonal causal attention, positions restart per document."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, 1, L, L] bool, True = may attend
    target_mask: torch.Tensor  # [R, L-1] float, 1 where token t+1 is a real token of the same document


def pack_documents(docs: list[list[int]], row_len: int, pad_id: int) -> PackedDocs:
    """First-fit-decreasing packing of whole documents into rows of `row_len` tokens.

    Each document attends only to itself (the 4-D mask is block-diagonal and causal) and its
    positions start at 0, so a packed document computes exactly what it would alone, without
    paying for the padding of a [batch, longest] layout.
    """
    docs = [d[:row_len] for d in docs]
    rows: list[list[list[int]]] = []
    space: list[int] = []
    for doc in sorted(docs, key=len, reverse=True):
        for i, free in enumerate(space):
            if len(doc) <= free:
                rows[i].append(doc)
                space[i] -= len(doc)
                break
        else:
            rows.append([doc])
            space.append(row_len - len(doc))
    width = max(row_len - min(space), 1) if rows else 1
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    doc_id = torch.full((n, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for k, doc in enumerate(row):
            input_ids[r, pos : pos + len(doc)] = torch.tensor(doc)
            position_ids[r, pos : pos + len(doc)] = torch.arange(len(doc))
            doc_id[r, pos : pos + len(doc)] = k
            pos += len(doc)
        # padding continues the positions of the row so that they stay in range
        position_ids[r, pos:] = torch.arange(width - pos)
    same = doc_id.unsqueeze(2) == doc_id.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    valid = (doc_id >= 0).unsqueeze(2)
    # a padding query attends to itself only, which keeps every softmax row non-empty
    eye = torch.eye(width, dtype=torch.bool).unsqueeze(0)
    mask = ((same & causal & valid) | eye).unsqueeze(1)
    target = ((doc_id[:, 1:] == doc_id[:, :-1]) & (doc_id[:, 1:] >= 0)).float()
    return PackedDocs(input_ids, position_ids, mask, target)
