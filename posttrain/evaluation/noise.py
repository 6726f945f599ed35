"""Sampling noise of accuracies measured on a fixed problem set (binomial standard errors).

Shared by the recovery scores of repair sweeps and the findings' noise rule.
"""

from __future__ import annotations

import math


def binomial_se(p: float, n: int | None) -> float | None:
    """Standard error sqrt(p (1 - p) / n) of an accuracy p measured on n problems (None without n)."""
    return None if not n else math.sqrt(max(p * (1.0 - p), 0.0) / n)


def combine_se(*ses: float | None) -> float | None:
    """SE of a sum or difference of independent estimates: sqrt(sum se_i^2) (None if any is unknown)."""
    return None if any(s is None for s in ses) else math.sqrt(sum(s * s for s in ses))
