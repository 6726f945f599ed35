"""The policy's forward pass for training: token log-probs, and entropy and values when asked."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.train.objectives import PolicyOutputs
from posttrain.train.sequences import PackedBatch, entropy_from_logits


class ValueHead(nn.Module):
    """A linear critic on the policy's final hidden state (PPO). Zero-initialised: V = 0 at start."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)

    def save(self, path: str | Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: str | Path) -> None:
        self.load_state_dict(load_file(str(path)))


def policy_forward(model, batch: PackedBatch, temperature: float = 1.0, entropy: bool = False,
                   value_head: ValueHead | None = None) -> PolicyOutputs:
    """One forward pass; every output is [B, T-1], aligned with `batch.target_mask`.

    With a value head the trunk runs once and feeds both the LM head and the critic. When the batch
    carries a `SharedPrefix` layout (GRPO groups), the model runs on that (each prompt once, no
    padding) and the per-token outputs are gathered back into the padded [B, T] layout.
    """
    values = None
    sh = batch.shared
    if sh is None:
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    else:
        inputs = dict(input_ids=sh.input_ids, attention_mask=sh.attention_mask, position_ids=sh.position_ids)

    def unshare(x: torch.Tensor) -> torch.Tensor:  # [R, L, ...] -> [B, T, ...]
        return x if sh is None else x.reshape(-1, *x.shape[2:])[sh.index]

    if value_head is None:
        logits = unshare(model(**inputs).logits)[:, :-1]
    else:
        hidden = unshare(model.base_model(**inputs).last_hidden_state)
        logits = model.get_output_embeddings()(hidden)[:, :-1]
        values = value_head(hidden)[:, :-1]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, 1:]
    logp = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    ent = entropy_from_logits(logits) if entropy else None
    return PolicyOutputs(logp=logp, entropy=ent, values=values)
