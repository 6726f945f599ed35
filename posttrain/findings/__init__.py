"""The findings table: which published claims held in a study, each with its numbers.

A finding is one registered function of a `Context` (the study's results, its config, and which
methods play which role, by their declared traits). It returns either `(holds, evidence)` (optionally
`(holds, evidence, stats)`, a dict of the numbers behind it copied into the entry), with
`holds` None when the run lacks what the claim needs, or, for a comparison, a `Measured` statistic:
the claim holds when `value` exceeds `threshold` beyond noise. Each rule is fixed in advance and
stated in the claim's text; nothing tunes a threshold to make a claim hold.

Noise rule of a `Measured` comparison (`decide`, `aggregate_findings`): with one seed, the margin
`value - threshold` must exceed twice its standard error `se` (binomial, from the fixed problem
sets; `se` None means the statistic has no sampling noise of its own, e.g. a weight-space ratio);
with several seeds, a 95% paired t-interval of the per-seed margins must exclude 0. Otherwise
`holds` is None and the evidence says "within noise". Every finding also reports in how many seeds
it held (`held_in`). A new finding is one function in one module of this package (imported below)::

    @finding("rl_keeps_format", "RL keeps the base's dominant format (rule: ...).", paper="arXiv ...")
    def rl_keeps_format(ctx: Context) -> Measured | tuple[bool | None, str]:
        if ctx.rl is None:
            return None, ctx.missing("rl")
        share_base, share_rl = ...
        return Measured(share_rl - share_base, 0.0, ctx.diff_se(...), f"numbers that decided it")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from posttrain.config import StudyConfig, init_ref
from posttrain.evaluation.noise import binomial_se, combine_se  # noqa: F401  (re-exported for findings)

NOISE_RULE = ("Noise rule: one seed, the margin must exceed twice its binomial standard error on the fixed problem "
              "sets; several seeds, a 95% paired interval over seeds must exclude it; otherwise within noise.")


@dataclass(frozen=True)
class Measured:
    """A comparison claim's statistic on one seed: the claim holds when `value` > `threshold` beyond
    noise; `se` is the standard error of `value` (None: no sampling noise of its own)."""

    value: float
    threshold: float = 0.0
    se: float | None = None
    evidence: str = ""


Rule = Callable[["Context"], "Measured | tuple[bool | None, str]"]


def decide(value: float, threshold: float, se: float | None) -> bool | None:
    """One seed's verdict: the margin against twice its standard error (plain comparison without one)."""
    margin = value - threshold
    if se is None or se == 0:
        return margin > 0
    if margin > 2 * se:
        return True
    if margin < -2 * se:
        return False
    return None


# two-sided 95% critical values of Student's t with df degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t (tabulated; df between table rows rounds down, conservatively)."""
    if df < 1:
        raise ValueError("a t-interval needs at least 2 values")
    return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.960


def paired_interval(margins: list[float]) -> tuple[float, float, float]:
    """(mean, lower, upper) of the 95% t-interval of the mean of `margins` (n >= 2)."""
    n = len(margins)
    mean = sum(margins) / n
    sd = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Finding:
    id: str
    claim: str  # the published claim and the rule used here, as shown in the report
    rule: Rule
    paper: str = ""  # where the claim comes from
    noisy: bool = False  # a comparison of measured accuracies: its claim states the noise rule


FINDINGS: dict[str, Finding] = {}


def finding(fid: str, claim: str, paper: str = "", noisy: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: register `rule` as the finding `fid` (findings are reported in registration order).
    `noisy`: the rule compares accuracies and returns `Measured` with a standard error; the claim
    text then ends with the noise rule."""

    def deco(rule: Rule) -> Rule:
        if fid in FINDINGS:
            raise ValueError(f"finding {fid!r} registered twice")
        FINDINGS[fid] = Finding(fid, f"{claim} {NOISE_RULE}" if noisy else claim, rule, paper, noisy)
        return rule

    return deco


class Context:
    """What a finding's rule reads: `results` (results.json so far), `cfg`, and the roles of the
    study's methods: `sft` (the first SFT-on-expert-data method without freezing rules) and `rl`
    (the first method whose objective learns from rewards and that does not start from another
    method of the study), each None when the study has none."""

    def __init__(self, results: dict, cfg: StudyConfig) -> None:
        self.results, self.cfg = results, cfg
        self.models, self.forgetting = results["models"], results["forgetting"]
        self.diagnostics, self.repairs = results["diagnostics"], results.get("repairs", {})
        self.base = self.models["base"]
        done = self.models
        # a frozen variant (freeze / train_only rules) is another experiment (findings/freezing.py)
        self.sft = next((n for n, m in cfg.methods.items()
                         if n in done and m.is_expert_sft and not (m.freeze or m.train_only)), None)
        # RL started from another method of the study (RL on top of SFT) is another experiment
        # (findings/heal.py), not "the RL method" compared with SFT
        self.rl = next((n for n, m in cfg.methods.items()
                        if n in done and m.is_rl and init_ref(m.init, cfg.methods) is None), None)

    def gain(self, name: str, key: str) -> float:
        return self.models[name][key] - self.base[key]

    def n(self, which: str) -> int | None:
        """Problems behind an accuracy: "id", "ood", or a retention probe's name (None if unknown)."""
        sizes = self.results.get("n_problems") or {}
        return sizes.get(which) if which in ("id", "ood") else (sizes.get("retention") or {}).get(which)

    def acc_se(self, name: str, key: str) -> float | None:
        """Binomial SE of model `name`'s "id_acc" / "ood_acc" on its fixed problem set."""
        return binomial_se(self.models[name][key], self.n(key.removesuffix("_acc")))

    def forgetting_se(self, *names: str) -> float | None:
        """SE of forgetting(a) - forgetting(b) (two names) or of forgetting(a) (one name): the mean over
        the K retention probes of accuracy differences, sqrt(sum of the probes' variances) / K."""
        probes = list(self.base["retention"])
        if not probes:
            return None
        who = list(names) if len(names) == 2 else ["base", names[0]]
        parts = [binomial_se(self.models[m]["retention"][k], self.n(k)) for k in probes for m in who]
        total = combine_se(*parts)
        return None if total is None else total / len(probes)

    def missing(self, *roles: str) -> str:
        """Evidence text for a run that lacks the methods in `roles` ("sft", "rl")."""
        labels = {"sft": "SFT method", "rl": "RL method"}
        absent = [labels[r] for r in roles if getattr(self, r) is None]
        return "this run has no " + " and no ".join(absent)


def evaluate_findings(results: dict, cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every registered finding's verdict on one seed's `results`, in order: {id, claim, holds,
    evidence, held_in}, plus {value, threshold, se} for a `Measured` comparison."""
    ctx = Context(results, cfg)
    out = []
    for f in FINDINGS.values():
        got = f.rule(ctx)
        entry: dict[str, Any] = {"id": f.id, "claim": f.claim}
        if isinstance(got, Measured):
            holds = decide(got.value, got.threshold, got.se)
            evidence = got.evidence
            if holds is None:
                evidence += (f"; within noise: margin {got.value - got.threshold:+.3f} vs 2 SE = {2 * got.se:.3f}")
            entry.update(holds=holds, evidence=evidence, value=got.value, threshold=got.threshold, se=got.se)
        else:
            # an optional third element: the statistics behind a non-comparison verdict (rho, R^2, ...)
            entry.update(holds=got[0], evidence=got[1], **(got[2] if len(got) > 2 else {}))
        entry["held_in"] = "1/1" if entry["holds"] else "0/1"
        out.append(entry)
    return out


def aggregate_findings(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One verdict per finding over several seeds' `evaluate_findings` outputs.

    A `Measured` comparison holds when the 95% paired t-interval of its per-seed margins (value -
    threshold) lies above 0, does not hold when it lies below 0, and is None ("within noise")
    otherwise; any other finding holds when it held in every seed, does not when it held in none,
    and is None when the seeds disagree or none could test it. `held_in` = "k/n": the seeds whose own
    verdict held.
    """
    seeds = sorted(per_seed)
    by_id: dict[str, list[dict]] = {}
    for s in seeds:
        for f in per_seed[s]:
            by_id.setdefault(f["id"], []).append({**f, "seed": s})
    out = []
    for fid, rows in by_id.items():
        n = len(rows)
        k = sum(1 for r in rows if r["holds"] is True)
        entry = {"id": fid, "claim": rows[0]["claim"], "held_in": f"{k}/{n}", "seeds": [r["seed"] for r in rows],
                 "per_seed": [r["holds"] for r in rows]}
        measured = [r for r in rows if r.get("value") is not None]
        if n >= 2 and len(measured) == n:
            margins = [r["value"] - r["threshold"] for r in measured]
            mean, lo, hi = paired_interval(margins)
            holds = True if lo > 0 else False if hi < 0 else None
            entry.update(holds=holds, value=sum(r["value"] for r in measured) / n, threshold=measured[0]["threshold"],
                         margin_ci95=[lo, hi],
                         evidence=(f"margin over {n} seeds {mean:+.3f}, 95% paired interval [{lo:+.3f}, {hi:+.3f}]"
                                   + ("" if holds is not None else " includes 0: within noise")
                                   + f"; held in {k}/{n} seeds (per seed: " + "; ".join(
                                       f"{r['seed']}: {r['evidence']}" for r in rows) + ")"))
        elif n == 1:
            entry.update({key: rows[0][key] for key in ("holds", "evidence") if key in rows[0]})
        else:
            tested = [r["holds"] for r in rows if r["holds"] is not None]
            holds = (True if tested and all(tested) and len(tested) == n else
                     False if tested and not any(tested) and len(tested) == n else None)
            entry.update(holds=holds, evidence=f"held in {k}/{n} seeds (per seed: " + "; ".join(
                f"{r['seed']}: {r['evidence']}" for r in rows) + ")")
        out.append(entry)
    return out


def fmt3(x: float) -> str:
    return f"{x:.3f}"


# registration order is report order
from posttrain.findings import learning, weights, spectra, repairs, formats, kl, heal, freezing, transfer  # noqa: E402,F401
