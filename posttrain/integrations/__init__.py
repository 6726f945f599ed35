"""posttrain's diagnostics inside other training loops (Hugging Face Trainer, TRL)."""

from posttrain.integrations.drift import DriftCallback

__all__ = ["DriftCallback"]
