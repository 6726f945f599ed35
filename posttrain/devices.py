"""The one device resolver every command uses (`--device auto|cpu|cuda|cuda:N|mps`).

It lives apart from `posttrain.models.loading` because that module imports transformers, which
costs seconds that `diff` and `repair` do not need to pay.
"""

from __future__ import annotations

import re

import torch

from posttrain.errors import UserError

KNOWN = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a `--device` value; a one-line `UserError` for an unknown or unavailable one."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if m := re.fullmatch(r"cuda(?::(\d+))?", name):
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("device 'mps' requested but MPS is not available")
        return torch.device("mps")
    raise UserError(f"unknown device {device!r} ({KNOWN})")


def device_name(device: str | torch.device = "auto") -> str:
    """`resolve_device` as a string (what accelerate and the config-facing functions take)."""
    return str(resolve_device(device))
