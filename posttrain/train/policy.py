"""The policy's forward pass for training (token log-probs, and entropy and values when asked)
and PPO's critics: a value head on the policy's trunk, or a separate critic model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.errors import UserError
from posttrain.io import atomic_dir
from posttrain.train.checkpointing import VALUE_HEAD_FILE, load_weights_into
from posttrain.train.objectives import PolicyOutputs
from posttrain.train.sequences import PackedBatch, entropy_from_logits


class ValueHead(nn.Module):
    """A linear value head on a trunk's final hidden state (PPO). Zero-initialised: V = 0 at start."""

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


class Critic(nn.Module):
    """PPO's separate critic (verl, OpenRLHF): a copy of a causal LM's trunk (its transformer
    without the LM head) plus a `ValueHead`, with weights of its own.

    Saved as a directory: the trunk as an HF checkpoint (`config.json`, `model.safetensors`,
    loadable with `AutoModel.from_pretrained`) and `value_head.safetensors` beside it.
    """

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ValueHead(hidden_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Critic":
        """The trunk of the causal LM at `path` (the policy's init) with a fresh zero value head."""
        from posttrain.models.loading import load_model

        lm, _ = load_model(path, device="cpu")
        trunk = lm.base_model
        trunk.requires_grad_(True)
        return cls(trunk, lm.config.hidden_size)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """V(s_t) for every position, [B, T-1], aligned with `batch.target_mask`."""
        inputs, unshare = _layout(batch)
        return self.head(unshare(self.trunk(**inputs).last_hidden_state))[:, :-1]

    def save(self, path: str | Path) -> Path:
        with atomic_dir(Path(path)) as tmp:
            self.trunk.save_pretrained(tmp, safe_serialization=True)
            self.head.save(tmp / VALUE_HEAD_FILE)
        return Path(path)

    def load(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / VALUE_HEAD_FILE).is_file():
            raise UserError(f"{path}: no critic here (expected the trunk and {VALUE_HEAD_FILE})")
        load_weights_into(self.trunk, path)
        self.head.load(path / VALUE_HEAD_FILE)


def _layout(batch: PackedBatch):
    """The model inputs of `batch` (its shared-prefix layout when it has one) and the function
    that gathers per-token outputs [R, L, ...] back into the padded [B, T, ...] layout."""
    sh = batch.shared
    if sh is None:
        return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask), lambda x: x
    inputs = dict(input_ids=sh.input_ids, attention_mask=sh.attention_mask, position_ids=sh.position_ids)
    return inputs, lambda x: x.reshape(-1, *x.shape[2:])[sh.index]


def policy_forward(model, batch: PackedBatch, temperature: float = 1.0, entropy: bool = False,
                   value_head: ValueHead | Critic | None = None, grad_groups: list[int] | None = None) -> PolicyOutputs:
    """One forward pass; every output is [B, T-1], aligned with `batch.target_mask`.

    With a `ValueHead` (PPO, shared critic) the trunk runs once and feeds both the LM head and the
    critic; a `Critic` (PPO, separate critic) runs its own trunk on the same batch. When the batch
    carries a `SharedPrefix` layout (GRPO groups), the model runs on that (each prompt once, no
    padding) and the per-token outputs are gathered back into the padded [B, T] layout.

    `temperature` divides the logits (log-probs and entropies are those of pi^(1/T)); values do
    not depend on it.

    `grad_groups` (shared layout only; log-probs only): just these prompt groups are computed with
    autograd; the others run without it and their log-probs carry no gradient. For groups whose
    loss gradient is exactly zero (every advantage 0, no KL or entropy term) this gives the same
    loss and gradient, without a backward pass through those groups.
    """
    if grad_groups is not None and batch.shared is not None and not entropy and value_head is None:
        return _split_forward(model, batch, temperature, grad_groups)
    values = None
    inputs, unshare = _layout(batch)
    if isinstance(value_head, ValueHead):
        hidden = unshare(model.base_model(**inputs).last_hidden_state)
        logits = model.get_output_embeddings()(hidden)[:, :-1]
        values = value_head(hidden)[:, :-1]
    else:
        logits = unshare(model(**inputs).logits)[:, :-1]
        if value_head is not None:
            values = value_head(batch)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, 1:]
    logp = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    ent = entropy_from_logits(logits) if entropy else None
    return PolicyOutputs(logp=logp, entropy=ent, values=values)


def _split_forward(model, batch: PackedBatch, temperature: float, grad_groups: list[int]) -> PolicyOutputs:
    keep = set(grad_groups)
    parts = [sorted(keep), [g for g in range(batch.shared.input_ids.shape[0]) if g not in keep]]
    width = batch.input_ids.shape[1] - 1
    pieces, order = [], []
    for k, groups in enumerate(parts):
        if not groups:
            continue
        sub = batch.select_groups(groups)
        with torch.set_grad_enabled(k == 0 and torch.is_grad_enabled()):
            logp = policy_forward(model, sub, temperature).logp
        pieces.append(torch.nn.functional.pad(logp, (0, width - logp.shape[1])))
        order += batch.group_rows(groups)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return PolicyOutputs(logp=torch.cat(pieces)[inverse.to(batch.input_ids.device)], entropy=None, values=None)
