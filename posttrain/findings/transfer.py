"""Two claims about what a method learns from and what it keeps: RL on a task's easier split
raises accuracy on its harder split (Echo Chamber, arXiv 2504.07912), and SFT on the model's own
verified samples forgets less than SFT on expert data (Retaining by Doing, arXiv 2510.18874)."""

from __future__ import annotations

from posttrain.config import init_ref
from posttrain.findings import Context, Measured, binomial_se, combine_se, decide, finding, fmt3

EASY_HARD = ("RL on a task's easier split raises accuracy on its harder split (rule: the RL method trains on a split "
             "whose task has a harder split, e.g. arith with 2 operations against 3, and the study evaluates that "
             "harder split as its OOD task or a retention probe; its accuracy there minus the base's must exceed twice "
             "its binomial standard error; several seeds: a 95% paired interval over seeds must exclude 0; otherwise "
             "within noise; untestable when the study trains RL on no such split).")
ON_POLICY = ("SFT on the model's own verified samples (Self-SFT) forgets less than SFT on expert data at a comparable "
             "in-domain gain (rule: the first Self-SFT method, filtered self-samples in one round from the base, "
             "against the plain expert SFT method: forgetting(SFT) - forgetting(Self-SFT) must exceed twice its "
             "binomial standard error; several seeds: a 95% paired interval over seeds must exclude 0; otherwise "
             "within noise; untestable when Self-SFT gained less in-domain than SFT beyond twice the SE of the "
             "difference, as learning less is then a cheaper way to forget less, or when the study has no Self-SFT).")


def harder_accuracy(ctx: Context, task: str, split: str) -> tuple[str, str, str] | None:
    """(label, accuracy kind, split name) where the study measured `task`/`split`: the OOD task or a
    retention probe (None: not measured)."""
    if ctx.cfg.ood_task.key == f"{task}/{split}":
        return f"{task}/{split} (OOD task)", "ood", ""
    ref = next((r for r in ctx.cfg.retention if getattr(r, "key", None) == f"{task}/{split}"), None)
    # a probe is named by its task, or by task/split when two probes share the task (results.probe_name)
    probe = next((p for p in (ref.task, ref.key) if p in ctx.base["retention"]), None) if ref is not None else None
    return None if probe is None else (f"{task}/{split} (retention probe)", "retention", probe)


@finding("rl_easy_to_hard", EASY_HARD, paper="arXiv 2504.07912")
def rl_easy_to_hard(ctx: Context):
    if ctx.rl is None:
        return None, ctx.missing("rl")
    m = ctx.cfg.methods[ctx.rl]
    harder = ctx.cfg.make_task(m.task).harder_split(m.split)
    if harder is None:
        return None, f"{ctx.rl} trains on {m.task}/{m.split}, which has no harder split"
    where = harder_accuracy(ctx, m.task, harder)
    if where is None:
        return None, f"{ctx.rl} trains on {m.task}/{m.split}; the study does not evaluate its harder split {m.task}/{harder}"
    label, kind, probe = where
    if kind == "ood":
        a0, a1, n = ctx.base["ood_acc"], ctx.models[ctx.rl]["ood_acc"], ctx.n("ood")
    else:
        a0, a1, n = ctx.base["retention"][probe], ctx.models[ctx.rl]["retention"][probe], ctx.n(probe)
    se = combine_se(binomial_se(a0, n), binomial_se(a1, n))
    return Measured(a1 - a0, 0.0, se, f"{ctx.rl} trained on {m.task}/{m.split}: {label} accuracy {fmt3(a0)} -> "
                                      f"{fmt3(a1)} ({a1 - a0:+.3f})")


def self_sft(ctx: Context) -> str | None:
    """The study's first Self-SFT method: SFT on its own filtered samples, one round, from the base."""
    cfg = ctx.cfg
    return next((n for n, m in cfg.methods.items() if n in ctx.models and not m.is_rl and m.data_source == "filtered"
                 and m.data_params.rounds == 1 and init_ref(m.init, cfg.methods) is None), None)


@finding("on_policy_forgets_less", ON_POLICY, paper="arXiv 2510.18874")
def on_policy_forgets_less(ctx: Context):
    own = self_sft(ctx)
    if own is None or ctx.sft is None:
        return None, ("this run has no Self-SFT method (SFT on filtered self-samples in one round: method: self_sft)"
                      if own is None else ctx.missing("sft"))
    gs, go = ctx.gain(ctx.sft, "id_acc"), ctx.gain(own, "id_acc")
    gse = combine_se(ctx.acc_se(ctx.sft, "id_acc"), ctx.acc_se(own, "id_acc"))
    f = ctx.forgetting
    ev = (f"forgetting {ctx.sft} {f[ctx.sft]:+.3f} vs {own} {f[own]:+.3f}; in-domain gain {ctx.sft} {gs:+.3f} vs "
          f"{own} {go:+.3f}")
    if decide(go - gs, 0.0, gse) is False:
        return None, ev + (f"; not comparable: {own} gained less beyond noise"
                           + (f" ({go - gs:+.3f} vs 2 SE = {2 * gse:.3f})" if gse else ""))
    return Measured(f[ctx.sft] - f[own], 0.0, ctx.forgetting_se(ctx.sft, own), ev)
