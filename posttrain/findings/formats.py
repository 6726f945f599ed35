"""Format collapse: RL concentrates its outputs on one format from pretraining (Echo Chamber, arXiv
2504.07912), read from the formats of the completions each method sampled while it trained."""

from __future__ import annotations

import math

from posttrain.analysis.format_shares import start_end, window_share
from posttrain.config import init_ref
from posttrain.findings import Context, Measured, binomial_se, combine_se, finding

WINDOW = 0.1
CLAIM = ("RL and Expert Iteration collapse their outputs onto the dominant pretraining format (rule: the base's "
         "most-sampled format, malformed excluded; for every RL and Expert Iteration method trained from the base, "
         "its share among the completions the method sampled during training, in the last 10% of its sampling "
         "steps (rounds, for Expert Iteration) minus in the first 10%; one seed: the method whose rise is smallest "
         "in units of its binomial standard error decides, its rise must exceed twice that SE; several seeds: a "
         "95% paired interval over seeds must exclude 0; otherwise within noise; a method with a single sampling "
         "round cannot be tested).")


def top_format(shares: dict[str, float]) -> tuple[str | None, float]:
    valid = {k: v for k, v in shares.items() if k != "malformed"}
    if not valid:
        return None, 0.0
    k = max(valid, key=valid.get)
    return k, valid[k]


def collapse_methods(ctx: Context) -> list[str]:
    """The study's RL and Expert Iteration (filtered on-policy data) methods trained from the base."""
    cfg = ctx.cfg
    return [n for n, m in cfg.methods.items() if n in ctx.models and init_ref(m.init, cfg.methods) is None
            and (m.is_rl or m.data_source == "filtered")]


def format_rise(points: list[dict], fmt: str) -> tuple[float, float, float, float | None, str] | None:
    """(start share, end share, rise, SE of the rise, steps) of `fmt` over a method's sampling
    points; None with fewer than two points. SE: binomial over each window's samples."""
    win = start_end(points, WINDOW)
    if win is None:
        return None
    (p0, n0), (p1, n1) = window_share(win[0], fmt), window_share(win[1], fmt)
    se = combine_se(binomial_se(p0, n0 or None), binomial_se(p1, n1 or None))
    steps = f"steps {win[0][0]['step']}-{win[0][-1]['step']} vs {win[1][0]['step']}-{win[1][-1]['step']}"
    return p0, p1, p1 - p0, se, steps


@finding("rl_format_collapse", CLAIM, paper="arXiv 2504.07912")
def rl_format_collapse(ctx: Context):
    names = collapse_methods(ctx)
    if not names:
        return None, "this run has no RL or Expert Iteration method trained from the base"
    fmt, share = top_format(ctx.base["format_share"])
    if fmt is None:
        return None, "the base sampled no well-formed completion: no dominant format"
    series = ctx.results.get("format_trajectories") or {}
    parts, tested = [], []
    for n in names:
        m = ctx.cfg.methods[n]
        # logs from before the sample count was logged: an RL step samples prompts x group size
        pts = [p if p["samples"] is not None else {**p, "samples": m.prompts_per_step * m.samples_per_prompt}
               for p in series.get(n) or []]
        got = format_rise(pts, fmt)
        if got is None:
            parts.append(f"{n}: {'one sampling round' if series.get(n) else 'no format shares over steps'}")
            continue
        p0, p1, rise, se, steps = got
        parts.append(f"{n}: {p0:.2f} -> {p1:.2f} ({rise:+.2f}, {steps})")
        z = rise / se if se else math.copysign(math.inf, rise) if rise else 0.0
        tested.append((z, rise, se))
    head = f"share of the base's top format {fmt} (base {share:.2f}) in the samples of training; "
    if not tested:
        return None, head + "; ".join(parts)
    z, rise, se = min(tested, key=lambda t: t[0])
    return Measured(rise, 0.0, se, head + "; ".join(parts))
