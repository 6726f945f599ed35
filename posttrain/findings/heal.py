"""Does RL started from an SFT model heal what SFT broke? The central experiment of "RL Is Neither a
Panacea Nor a Mirage" (arXiv 2508.16546): RL from the final SFT checkpoint (SFT_END), from its
peak-OOD checkpoint (SFT_MaxOOD) and from an over-trained SFT model.

Roles come from the config: an SFT start is a method trained on expert data; an RL-from-SFT method
is one whose objective learns from rewards and whose `init` names an SFT method (`sft`, `sft@end`,
`sft@step-N`, `sft@peak_ood`). The step it started from is the resolved one in results.json
`init_from` (for `@peak_ood`, the step the study picked)."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import init_ref
from posttrain.findings import Context, Measured, combine_se, finding, fmt3


@dataclass(frozen=True)
class Start:
    """An RL method started from an SFT method's checkpoint."""

    rl: str  # the RL method
    sft: str  # the SFT method it started from
    step: int | None  # the SFT step it started from (None: unknown)
    point: str  # "end", "step-<N>" or "peak_ood"

    @property
    def label(self) -> str:
        return f"{self.sft}@step-{self.step}" if self.step is not None else f"{self.sft}@{self.point}"


def rl_from_sft(ctx: Context) -> list[Start]:
    """The study's RL methods that started from an SFT-on-expert-data method, in config order."""
    methods, done = ctx.cfg.methods, ctx.models
    starts = ctx.results.get("init_from") or {}
    peaks = ctx.results.get("peak_ood") or {}
    out = []
    for name, m in methods.items():
        if name not in done or not m.is_rl:
            continue
        try:
            ref = init_ref(m.init, methods)
        except ValueError:
            continue
        if ref is None or not methods[ref.method].is_expert_sft:
            continue
        step = (starts.get(name) or {}).get("step")
        if step is None:
            step = {"end": methods[ref.method].steps, "peak_ood": (peaks.get(ref.method) or {}).get("step")}.get(
                ref.point, ref.step)
        out.append(Start(name, ref.method, step, ref.point))
    return out


def from_final(ctx: Context, starts: list[Start]) -> Start | None:
    """RL from an SFT method's final model: the study's main SFT method's first, else any."""
    finals = [s for s in starts if s.step == ctx.cfg.methods[s.sft].steps]
    return next((s for s in finals if s.sft == ctx.sft), finals[0] if finals else None)


def no_start(ctx: Context, what: str) -> str:
    return ("this run has no SFT method" if ctx.sft is None else
            f"this run has no RL method started from {what} (a method with init: <sft> or <sft>@...)")


HEALS = ("RL started from the final SFT model recovers part of the OOD accuracy SFT lost: the fraction recovered "
         "(ood(RL from SFT) - ood(SFT)) / (ood(base) - ood(SFT)) is above 0, i.e. ood(RL from SFT) - ood(SFT) > 0; "
         "not tested unless SFT lost OOD accuracy (ood(base) - ood(SFT) > 0 by more than 2 SE of the difference).")


@finding("rl_heals_sft_ood", HEALS, paper="arXiv 2508.16546", noisy=True)
def rl_heals_sft_ood(ctx: Context):
    s = from_final(ctx, rl_from_sft(ctx))
    if s is None:
        return None, no_start(ctx, "an SFT model's final checkpoint")
    base, sft, rl = (ctx.models[n]["ood_acc"] for n in ("base", s.sft, s.rl))
    lost, lost_se = base - sft, combine_se(ctx.acc_se("base", "ood_acc"), ctx.acc_se(s.sft, "ood_acc"))
    if lost <= 0 or (lost_se is not None and lost <= 2 * lost_se):
        noise = "" if lost_se is None else f", 2 SE = {2 * lost_se:.3f}"
        return None, (f"{s.sft} did not lose OOD accuracy beyond noise (base {fmt3(base)} -> {s.sft} {fmt3(sft)}, "
                      f"lost {lost:+.3f}{noise}): nothing to heal; {s.rl} from {s.label}: ood {fmt3(rl)}")
    frac = (rl - sft) / lost
    return Measured(rl - sft, 0.0, combine_se(ctx.acc_se(s.rl, "ood_acc"), ctx.acc_se(s.sft, "ood_acc")),
                    f"ood: base {fmt3(base)}, {s.sft} {fmt3(sft)} (lost {lost:.3f}), {s.rl} (RL from {s.label}) "
                    f"{fmt3(rl)}: recovered {100 * frac:.0f}% of the loss")


STRONGER = ("RL from a less over-trained SFT checkpoint ends with higher OOD accuracy than RL from an over-trained one: "
            "ood(RL from the peak-OOD SFT checkpoint, else from the SFT start with the fewest steps) - ood(RL from "
            "the SFT start with the most steps) > 0.")


@finding("stronger_sft_heals_better", STRONGER, paper="arXiv 2508.16546", noisy=True)
def stronger_sft_heals_better(ctx: Context):
    starts = [s for s in rl_from_sft(ctx) if s.step is not None]
    if len(starts) < 2:
        return None, no_start(ctx, "two different SFT checkpoints")
    over = max(starts, key=lambda s: s.step)
    peak = [s for s in starts if s.point == "peak_ood" and s.step < over.step]
    fresh = peak[0] if peak else min(starts, key=lambda s: s.step)
    if fresh.step >= over.step:
        return None, f"every RL-from-SFT method starts at the same SFT step ({over.step})"
    a, b = ctx.models[fresh.rl]["ood_acc"], ctx.models[over.rl]["ood_acc"]

    def start_ood(s: Start) -> str:
        pts = (ctx.results.get("checkpoint_evals") or {}).get(s.sft) or []
        at = next((p["ood_acc"] for p in pts if p["step"] == s.step), None)
        return "" if at is None else f", start ood {fmt3(at)}"

    return Measured(a - b, 0.0, combine_se(ctx.acc_se(fresh.rl, "ood_acc"), ctx.acc_se(over.rl, "ood_acc")),
                    f"{fresh.rl} (RL from {fresh.label}{start_ood(fresh)}) ood {fmt3(a)} vs {over.rl} "
                    f"(RL from {over.label}{start_ood(over)}) ood {fmt3(b)}")


UNDOES = ("RL counteracts SFT's rotation of singular vectors: the mean top-k principal angle between the base and "
          "the model RL made from the final SFT model is smaller than between the base and that SFT model (weight "
          "space, no sampling noise; several seeds: a 95% paired interval over seeds).")


@finding("rl_undoes_sft_rotation", UNDOES, paper="arXiv 2508.16546")
def rl_undoes_sft_rotation(ctx: Context):
    s = from_final(ctx, rl_from_sft(ctx))
    if s is None:
        return None, no_start(ctx, "an SFT model's final checkpoint")
    a_sft = ctx.diagnostics.get(s.sft, {}).get("principal_angle_top")
    a_rl = ctx.diagnostics.get(s.rl, {}).get("principal_angle_top")
    if a_sft is None or a_rl is None:
        return None, "no spectral diagnostics (diagnostics.spectral: false)"
    return Measured(a_sft - a_rl, 0.0, None,
                    f"top-k principal angle to the base: {s.sft} {a_sft:.2f} deg, {s.rl} (RL from {s.label}) "
                    f"{a_rl:.2f} deg")
