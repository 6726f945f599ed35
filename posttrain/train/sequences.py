"""Token-level plumbing shared by pretraining, post-training and evaluation.

Sequences are laid out as ``<bos> prompt completion <eos>`` and right-padded; `completion_mask`
marks the target positions that belong to the completion, already shifted so that entry ``t``
refers to the prediction of token ``t + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.errors import UserError


def _encode(tok, texts: list[str], what: str) -> list[list[int]]:
    """Token ids of `texts`; a text the tokenizer cannot encode (the tiny world's character
    tokenizer has no unknown token) is a one-line `UserError` naming it, not a tokenizers panic."""
    try:
        return tok(texts, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception ("WordLevel error: Missing [UNK] token")
        vocab = tok.get_vocab()
        for text in texts:
            try:
                tok([text], add_special_tokens=False)
            except Exception:  # noqa: BLE001
                bad = sorted({c for c in text if c not in vocab}) or [text[:20]]
                raise UserError(f"the tokenizer cannot encode {', '.join(map(repr, bad))} in the {what} {text[:60]!r} "
                                "(the tiny world's character tokenizer knows printable ASCII only)") from None
        raise


def encode_prompts(tok, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, prefixed with BOS when the tokenizer has one; an instruct model's
    prompts are wrapped in its chat template instead (`posttrain.models.chat`), which carries its
    own special tokens. Every prompt of training, sampling and evaluation is encoded here."""
    from posttrain.models.chat import chat_prompts, uses_chat_template

    if uses_chat_template(tok):
        return _encode(tok, chat_prompts(tok, prompts), "prompt")
    ids = _encode(tok, prompts, "prompt")
    if tok.bos_token_id is not None:
        ids = [[tok.bos_token_id, *x] for x in ids]
    return ids


def encode_completions(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each completion text followed by EOS."""
    ids = _encode(tok, texts, "completion")
    return [[*x, tok.eos_token_id] for x in ids]


@dataclass
class SharedPrefix:
    """A group of rows that share one prompt, laid out once per group as [prompt, c_1, ..., c_G].

    Completion i attends to the prompt and to itself (4-D mask) and its positions continue from the
    prompt's, so every token computes what it would in its own padded row, while the prompt is
    computed once per group and nothing is spent on padding. `index[b, t]` is the flat position
    (into R*L) of token t of padded row b (0 for padding, which is masked anyway).
    """

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, 1, L, L] bool, True = may attend
    index: torch.Tensor  # [B, T] long

    def to(self, device: torch.device) -> "SharedPrefix":
        return SharedPrefix(*(x.to(device) for x in (self.input_ids, self.position_ids, self.attention_mask, self.index)))


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T-1] float: 1 where token t+1 is a completion token
    shared: SharedPrefix | None = None  # the same rows with each group's prompt computed once
    pad_id: int = 0

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                           None if self.shared is None else self.shared.to(device), self.pad_id)

    def padded(self) -> "PackedBatch":
        """The same batch without the shared-prefix layout (one padded row per sequence)."""
        return PackedBatch(self.input_ids, self.attention_mask, self.target_mask, None, self.pad_id)

    def group_rows(self, groups: list[int]) -> list[int]:
        """The rows of the given prompt groups (a batch with a `SharedPrefix` layout), in order."""
        size = self.input_ids.shape[0] // self.shared.input_ids.shape[0]
        return [g * size + i for g in groups for i in range(size)]

    def select_groups(self, groups: list[int]) -> "PackedBatch":
        """The rows of the given prompt groups with their shared-prefix layout, exactly as `pack`
        would build them from those rows alone (cut from this batch's tensors, not re-packed)."""
        sh = self.shared
        L = sh.input_ids.shape[1]
        dev = self.input_ids.device
        g = torch.tensor(groups, dtype=torch.long, device=dev)
        rows = torch.tensor(self.group_rows(groups), dtype=torch.long, device=dev)
        lengths = self.attention_mask[rows].sum(-1)
        width = int(lengths.max())
        real = torch.arange(self.input_ids.shape[1], device=dev) < lengths.unsqueeze(-1)
        local = sh.index[rows] % L  # each token's position within its group's shared row
        # a group's shared row ends after its last real token
        used = int(torch.where(real, local, 0).max()) + 1
        size = rows.numel() // g.numel()
        new_row = torch.arange(g.numel(), device=dev).repeat_interleave(size).unsqueeze(-1)
        index = torch.where(real, new_row * used + local, 0)[:, :width]
        shared = SharedPrefix(sh.input_ids[g, :used], sh.position_ids[g, :used],
                              sh.attention_mask[g][:, :, :used, :used], index)
        return PackedBatch(self.input_ids[rows, :width], self.attention_mask[rows, :width],
                           self.target_mask[rows, : width - 1], shared, self.pad_id)

def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, max_length: int | None = None,
         group_size: int = 1) -> PackedBatch:
    """Concatenate prompt and completion per row and right-pad; truncate from the right if needed.

    With `group_size` > 1 and every run of `group_size` consecutive rows sharing its prompt (GRPO
    groups), the batch also carries the `SharedPrefix` layout that `policy_forward` computes on.
    """
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
    shared = share_prefixes(rows, starts, group_size, pad_id, width) if group_size > 1 else None
    return PackedBatch(input_ids, attention, target, shared, pad_id)


def share_prefixes(rows: list[list[int]], starts: list[int], group: int, pad_id: int, width: int) -> SharedPrefix | None:
    """The `SharedPrefix` layout of `rows` (prompt = row[:start]); None unless the rows come in
    groups of `group` with identical prompts."""
    n = len(rows)
    if n % group:
        return None
    groups = [range(g, g + group) for g in range(0, n, group)]
    for members in groups:
        first = rows[members[0]][: starts[members[0]]]
        if any(rows[i][: starts[i]] != first for i in members):
            return None
    lengths = [starts[m[0]] + sum(len(rows[i]) - starts[i] for i in m) for m in groups]
    L = max(lengths)
    R = len(groups)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), -2, dtype=torch.long)  # -1 prompt, i completion i, -2 padding
    index = torch.zeros((n, width), dtype=torch.long)
    for r, members in enumerate(groups):
        P = starts[members[0]]
        input_ids[r, :P] = torch.tensor(rows[members[0]][:P], dtype=torch.long)
        position_ids[r, :P] = torch.arange(P)
        seg[r, :P] = -1
        index[list(members), :P] = r * L + torch.arange(P)
        off = P
        for k, i in enumerate(members):
            c = rows[i][P:]
            input_ids[r, off : off + len(c)] = torch.tensor(c, dtype=torch.long)
            position_ids[r, off : off + len(c)] = torch.arange(P, P + len(c))
            seg[r, off : off + len(c)] = k
            index[i, P : P + len(c)] = r * L + off + torch.arange(len(c))
            off += len(c)
        position_ids[r, off:] = torch.arange(L - off)  # padding: any in-range position
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    mask = causal & (q >= -1) & ((k == -1) | (k == q))
    mask |= torch.eye(L, dtype=torch.bool)  # a padding query attends to itself: no empty softmax row
    return SharedPrefix(input_ids, position_ids, mask.unsqueeze(1), index)


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
