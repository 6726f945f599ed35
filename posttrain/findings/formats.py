"""Format collapse: RL concentrates outputs on one format from pretraining (Echo Chamber, arXiv 2504.07912)."""

from __future__ import annotations

from posttrain.findings import Context, finding

CLAIM = "RL collapses outputs onto one format (top format share >= 0.9 and above the base's)."


def top_format(shares: dict[str, float]) -> tuple[str | None, float]:
    valid = {k: v for k, v in shares.items() if k != "malformed"}
    if not valid:
        return None, 0.0
    k = max(valid, key=valid.get)
    return k, valid[k]


@finding("rl_format_collapse", CLAIM, paper="arXiv 2504.07912")
def rl_format_collapse(ctx: Context):
    if ctx.rl is None:
        return None, ctx.missing("sft", "rl")
    fb, sb = top_format(ctx.base["format_share"])
    fr, sr = top_format(ctx.models[ctx.rl]["format_share"])
    return sr >= 0.9 and sr > sb, f"sampled format shares: base top {fb} {sb:.2f}; {ctx.rl} top {fr} {sr:.2f}"
