"""Does freezing part of the model during SFT reduce forgetting? Scalpel vs Hammer (arXiv
2507.10616) froze the MLPs or the attention query/key weights during SFT; its own result was
inconclusive. A frozen variant is an SFT-on-expert-data method trained from the base with `freeze`
or `train_only` rules (configs/freezing.yaml ships two beside plain SFT); it is compared with the
study's plain SFT method (`Context.sft`, which never has freezing rules)."""

from __future__ import annotations

import math

from posttrain.config import init_ref
from posttrain.findings import Context, Measured, combine_se, decide, finding

CLAIM = ("Freezing part of the model during SFT reduces forgetting (rule: every SFT-on-expert-data method trained "
         "from the base with freezing rules, e.g. mid-layer MLPs or Q/K frozen, against plain SFT: forgetting(plain) "
         "- forgetting(frozen); the variant whose reduction is smallest in units of its standard error decides, it "
         "must exceed twice that SE (one seed; several seeds: a 95% paired interval over seeds must exclude 0; "
         "otherwise within noise); the in-domain gain of each variant against plain SFT is reported beside it with "
         "the same noise rule; untestable without a frozen SFT method, as in the default study: configs/freezing.yaml "
         "has them).")


def frozen_sft(ctx: Context) -> list[str]:
    """The study's frozen SFT variants (expert data, from the base, freezing rules), in config order."""
    cfg = ctx.cfg
    return [n for n, m in cfg.methods.items() if n in ctx.models and n != ctx.sft and m.is_expert_sft
            and (m.freeze or m.train_only) and init_ref(m.init, cfg.methods) is None]


def _verdict(value: float, se: float | None) -> str:
    return {True: "higher", False: "lower", None: "within noise"}[decide(value, 0.0, se)]


@finding("freezing_reduces_forgetting", CLAIM, paper="arXiv 2507.10616")
def freezing_reduces_forgetting(ctx: Context):
    variants = frozen_sft(ctx)
    if ctx.sft is None or not variants:
        why = ("this run has no plain SFT method" if ctx.sft is None else
               "this run has no frozen SFT method (run configs/freezing.yaml: SFT with mid-layer MLPs frozen and "
               "with Q/K frozen beside plain SFT)")
        return None, why
    f, cfg = ctx.forgetting, ctx.cfg
    parts, tested = [], []
    for n in variants:
        red, se = f[ctx.sft] - f[n], ctx.forgetting_se(ctx.sft, n)
        dg = ctx.gain(n, "id_acc") - ctx.gain(ctx.sft, "id_acc")
        gse = combine_se(ctx.acc_se(n, "id_acc"), ctx.acc_se(ctx.sft, "id_acc"))
        rules = ", ".join([*(f"freeze {r}" for r in cfg.methods[n].freeze),
                           *(f"train only {r}" for r in cfg.methods[n].train_only)])
        parts.append(f"{n} ({rules}): forgetting {f[n]:+.3f} vs {ctx.sft} {f[ctx.sft]:+.3f} (reduction {red:+.3f}"
                     + (f" ± {se:.3f} SE" if se is not None else "") + f"); in-domain gain {dg:+.3f} vs {ctx.sft} ("
                     + _verdict(dg, gse) + ")")
        z = red / se if se else math.copysign(math.inf, red) if red else 0.0
        tested.append((z, red, se))
    _, red, se = min(tested, key=lambda t: t[0])
    return Measured(red, 0.0, se, "; ".join(parts))
