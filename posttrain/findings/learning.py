"""What each method gained in-domain, lost out of domain and forgot (Scalpel vs Hammer, arXiv
2507.10616; "SFT Memorizes, RL Generalizes", arXiv 2501.17161). Every rule compares accuracies on
the study's fixed problem sets and so carries the noise rule (`posttrain.findings.decide`)."""

from __future__ import annotations

from posttrain.findings import Context, Measured, combine_se, finding, fmt3


def _gain_claim(ctx: Context, name: str | None) -> Measured | tuple[None, str]:
    if name is None:
        return None, ctx.missing("sft", "rl")
    g = ctx.gain(name, "id_acc")
    return Measured(g, 0.0, combine_se(ctx.acc_se(name, "id_acc"), ctx.acc_se("base", "id_acc")),
                    f"{name}: id_acc {fmt3(ctx.base['id_acc'])} -> {fmt3(ctx.models[name]['id_acc'])} ({g:+.3f})")


@finding("sft_gains_id", "SFT raises in-domain accuracy over the base.", noisy=True)
def sft_gains_id(ctx: Context):
    return _gain_claim(ctx, ctx.sft)


@finding("rl_gains_id", "RL raises in-domain accuracy over the base.", noisy=True)
def rl_gains_id(ctx: Context):
    return _gain_claim(ctx, ctx.rl)


def _both(ctx: Context) -> str | None:
    """The evidence text when the study lacks the SFT or the RL method of a comparison."""
    return ctx.missing("sft", "rl") if ctx.sft is None or ctx.rl is None else None


@finding("sft_gains_more_id", "SFT on expert data gains more in-domain than RL.", paper="arXiv 2507.10616", noisy=True)
def sft_gains_more_id(ctx: Context):
    if (miss := _both(ctx)) is not None:
        return None, miss
    gs, gr = ctx.gain(ctx.sft, "id_acc"), ctx.gain(ctx.rl, "id_acc")
    se = combine_se(ctx.acc_se(ctx.sft, "id_acc"), ctx.acc_se(ctx.rl, "id_acc"))  # the base cancels
    return Measured(gs - gr, 0.0, se, f"id gain {ctx.sft} {gs:+.3f} vs {ctx.rl} {gr:+.3f}")


@finding("sft_forgets_more", "SFT forgets more than RL (larger mean drop on retention probes).",
         paper="arXiv 2507.10616", noisy=True)
def sft_forgets_more(ctx: Context):
    if (miss := _both(ctx)) is not None:
        return None, miss
    f = ctx.forgetting
    return Measured(f[ctx.sft] - f[ctx.rl], 0.0, ctx.forgetting_se(ctx.sft, ctx.rl),
                    f"forgetting {ctx.sft} {f[ctx.sft]:+.3f} vs {ctx.rl} {f[ctx.rl]:+.3f}")


@finding("rl_forgets_little", "RL forgets little: mean retention drop below 0.05.", paper="arXiv 2507.10616", noisy=True)
def rl_forgets_little(ctx: Context):
    if (miss := _both(ctx)) is not None:
        return None, miss
    f = ctx.forgetting[ctx.rl]
    return Measured(-f, -0.05, ctx.forgetting_se(ctx.rl), f"forgetting {ctx.rl} {f:+.3f}")


@finding("rl_generalizes_ood", "RL generalises better out of domain than SFT (larger OOD change).",
         paper="arXiv 2501.17161", noisy=True)
def rl_generalizes_ood(ctx: Context):
    if (miss := _both(ctx)) is not None:
        return None, miss
    os_, or_ = ctx.gain(ctx.sft, "ood_acc"), ctx.gain(ctx.rl, "ood_acc")
    se = combine_se(ctx.acc_se(ctx.sft, "ood_acc"), ctx.acc_se(ctx.rl, "ood_acc"))
    return Measured(or_ - os_, 0.0, se,
                    f"ood change {ctx.sft} {os_:+.3f} vs {ctx.rl} {or_:+.3f} (base ood {fmt3(ctx.base['ood_acc'])})")
