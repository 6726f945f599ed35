"""LoRA through `peft` for any training method (`lora: {r, alpha, dropout, target_modules}`).

Only the adapters train. Everything outside the loop sees full models: the method's final model and
its kept checkpoints are the merged weights (W + (alpha / r) B A, what peft's `merge_and_unload`
writes) under the base's tensor names, so diagnostics, repairs and evaluation read them unchanged.
A kept checkpoint also holds the adapters (`adapter/adapter.safetensors`): the base weights never
change, so resuming loads the adapters into a fresh injection and continues bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posttrain.config import LoraSpec
from posttrain.errors import UserError

ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter.safetensors"
LORA_KEY = "lora_"  # every adapter tensor's name holds it (lora_A, lora_B, lora_dropout)


def attach(model: torch.nn.Module, spec: LoraSpec, where: str = "lora") -> "LoraPolicy":
    """Inject adapters into `model` in place (its class, forward and trunk stay those of the HF model)
    and freeze every other parameter."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.target_modules),
                     bias="none")
    try:
        wrapper = get_peft_model(model, cfg)
    except ValueError as e:
        raise UserError(f"{where}.target_modules: {str(e).splitlines()[0][:200]}") from None
    return LoraPolicy(model, wrapper)


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights with every adapter merged in, under the names of the model without adapters.
    The same arithmetic as peft's merge: base_layer.weight + get_delta_weight (in the weight's dtype)."""
    layers = _lora_layers(model)
    out = {}
    for name, t in model.state_dict().items():
        if LORA_KEY in name:
            continue
        plain = name.replace(".base_layer.", ".")
        module = plain.rsplit(".", 1)[0]
        if name.endswith(".base_layer.weight") and module in layers:
            with torch.no_grad():
                t = t + layers[module].get_delta_weight("default").to(t.dtype)
        out[plain] = t
    return out


class LoraPolicy:
    """The training loop's handle on a model with adapters: what to save, resume and reset."""

    def __init__(self, model: torch.nn.Module, wrapper) -> None:
        self.model, self.wrapper = model, wrapper
        self.initial = {k: v.detach().clone() for k, v in self.adapter_state().items()}

    @property
    def config(self):
        return self.model.config

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if LORA_KEY in k}

    def save_pretrained(self, path, **kw) -> None:
        """The merged full model (an HF checkpoint) plus the adapters in `adapter/`."""
        self.model.save_pretrained(path, state_dict=merged_state_dict(self.model), **kw)
        (Path(path) / ADAPTER_DIR).mkdir(exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.adapter_state().items()},
                  str(Path(path) / ADAPTER_DIR / ADAPTER_FILE))

    def load_checkpoint_weights(self, ck: Path) -> None:
        """Resume: the adapters of a kept checkpoint (the frozen base weights are the init's)."""
        f = Path(ck) / ADAPTER_DIR / ADAPTER_FILE
        if not f.is_file():
            raise UserError(f"{ck}: no {ADAPTER_DIR}/{ADAPTER_FILE} (was this run trained without lora?)")
        self._load(load_file(str(f)), ck)

    def reset(self) -> None:
        """Back to the adapters at injection (the init model): a data round that restarts from init."""
        self._load(self.initial, "the initial adapters")

    def _load(self, state: dict[str, torch.Tensor], where) -> None:
        params = self.adapter_state()
        if set(state) != set(params):
            raise UserError(f"{where}: adapter tensors do not match this method's lora settings")
        with torch.no_grad():
            for k, t in state.items():
                if tuple(t.shape) != tuple(params[k].shape):
                    raise UserError(f"{where}: adapter tensor {k} has shape {list(t.shape)}, expected {list(params[k].shape)}")
                params[k].copy_(t.to(params[k].dtype))
