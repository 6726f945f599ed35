"""RL's Razor (arXiv 2509.04259): forgetting is predicted by the KL between the fine-tuned and the
base policy on the new task, better than by how far the weights moved."""

from __future__ import annotations

from posttrain.analysis.predictors import PREDICTORS, points_from_results, predictor_fits
from posttrain.findings import Context, finding

MIN_MODELS = 6
RHO = 0.7
PRIMARY = "kl_pi0_pi_per_seq"  # the paper's E_x KL(pi0(.|x) || pi(.|x)), samples from the base


def _fmt(fit: dict) -> str:
    rho, r2 = fit["rho"], fit["r2"]
    return (f"rho {'undefined' if rho is None else f'{rho:+.2f}'}, "
            f"R^2 {'undefined' if r2 is None else f'{r2:.2f}'}")


@finding("kl_predicts_forgetting",
         f"Forgetting rises with the KL to the base on the fine-tuning task (rule: Spearman rho of forgetting "
         f"against KL(pi0 || pi) per sequence, completions sampled from the base at temperature 1 on held-out "
         f"prompts, >= {RHO} over at least {MIN_MODELS} trained models; the evidence also compares it with the "
         f"relative weight update).", paper="arXiv 2509.04259")
def kl_predicts_forgetting(ctx: Context):
    return kl_verdict(points_from_results(ctx.results))


def kl_verdict(points: list[dict]) -> tuple[bool | None, str, dict]:
    """The rule of `kl_predicts_forgetting` over any list of per-model points
    (`posttrain.analysis.predictors`): one study's models, or the models of several seeds or sweep
    cells pooled (`pooled_points`). Returns (holds, evidence, stats)."""
    fits = predictor_fits(points)
    main = fits[PRIMARY]
    n, rho, upd = main["n"], main["rho"], fits["rel_update_total"]["rho"]
    stats = {"n_models": n, "rho": rho, "r2": main["r2"], "rho_rel_update": upd, "r2_rel_update": fits["rel_update_total"]["r2"]}
    if n < MIN_MODELS:
        return None, (f"untestable: {n} trained model{'s' * (n != 1)} with forgetting and KL, needs at least "
                      f"{MIN_MODELS}" + (f" (so far {_fmt(main)})" if n >= 2 else "")), stats
    others = "; ".join(f"{PREDICTORS[k]}: {_fmt(fits[k])}" for k in ("kl_pi_pi0_per_seq", "rel_update_total"))
    evidence = f"{n} models, {PREDICTORS[PRIMARY]}: {_fmt(main)}; {others}"
    if rho is not None and upd is not None:
        better = "better than" if rho > upd else "no better than"
        evidence += f"; KL predicts forgetting {better} the weight-update norm (rho {rho:+.2f} vs {upd:+.2f})"
    if rho is None:
        return None, evidence + " (forgetting or KL constant across models)", stats
    return rho >= RHO, evidence, stats
