"""The `Checkpoint` read interface of the diff scan over tensors held in memory.

`posttrain.analysis.scan.scan` reads weights through `shape`, `dtype`, `get` and `get_block`; this
adapter serves them from a live model's state dict (views of its parameters, on whatever device they
live), so a model being trained is diffed against a checkpoint on disk by exactly the code of
`posttrain diff`, one tensor block at a time and without a second copy of the model.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from posttrain.errors import UserError

# safetensors' dtype names, as `Checkpoint.dtype` reports them
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class LiveWeights:
    """Read-only tensors by name, in memory; `label` names them in error messages."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "model") -> None:
        self.path = label
        self._t = dict(tensors)

    @classmethod
    def of(cls, module: torch.nn.Module, names: list[str], label: str = "model") -> "LiveWeights":
        """The tensors `names` of `module`'s state dict (shared storage, not copies)."""
        state = module.state_dict()
        missing = [n for n in names if n not in state]
        if missing:
            raise UserError(f"{label}: no tensor named {missing[0]} (the weights were saved under other names"
                            + (f"; {len(missing) - 1} more" if len(missing) > 1 else "") + ")")
        return cls({n: state[n] for n in names}, label)

    def names(self) -> list[str]:
        return list(self._t)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._t[name]
        except KeyError:
            raise UserError(f"{self.path}: no tensor named {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> str:
        dt = self._get(name).dtype
        return _DTYPE_NAMES.get(dt, str(dt).removeprefix("torch."))

    def get(self, name: str) -> torch.Tensor:
        return self._get(name).detach()

    def get_block(self, name: str, start: int, stop: int, dim: int = 0) -> torch.Tensor:
        t = self._get(name).detach()
        return t[start:stop] if dim == 0 else t[:, start:stop]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._t:
            yield name, self.get(name)
