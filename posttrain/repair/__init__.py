"""Cheap repairs of post-training damage: UV-merge, layer reset, interpolation, task arithmetic.

Every repair is a registered `Repair` (see `base.py`); `write_repair` streams its output into a
complete Hugging Face checkpoint, and `run_repair_sweep` evaluates a grid of repairs.
"""

from posttrain.repair import interpolate, layer_reset, uv_merge  # noqa: F401  (registers the repairs)
from posttrain.repair.base import REPAIRS, Repair, get_repair, register_repair
from posttrain.repair.writer import write_repair

__all__ = ["REPAIRS", "Repair", "get_repair", "register_repair", "write_repair"]
