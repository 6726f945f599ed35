"""The findings table: which published claims held in a study, each with its numbers.

A finding is one registered function of a `Context` (the study's results, its config, and which
methods play which role, by their declared traits) that returns `(holds, evidence)`; `holds` is None
when the run lacks what the claim needs. Each rule is fixed in advance and stated in the claim's
text; nothing tunes a threshold to make a claim hold. A new finding is one function in one module
of this package (imported below so that it registers)::

    @finding("rl_keeps_format", "RL keeps the base's dominant format (rule: ...).", paper="arXiv ...")
    def rl_keeps_format(ctx: Context) -> tuple[bool | None, str]:
        if ctx.rl is None:
            return None, ctx.missing("rl")
        ...
        return holds, f"numbers that decided it"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from posttrain.config import StudyConfig

Rule = Callable[["Context"], tuple[bool | None, str]]


@dataclass(frozen=True)
class Finding:
    id: str
    claim: str  # the published claim and the rule used here, as shown in the report
    rule: Rule
    paper: str = ""  # where the claim comes from


FINDINGS: dict[str, Finding] = {}


def finding(fid: str, claim: str, paper: str = "") -> Callable[[Rule], Rule]:
    """Decorator: register `rule` as the finding `fid` (findings are reported in registration order)."""

    def deco(rule: Rule) -> Rule:
        if fid in FINDINGS:
            raise ValueError(f"finding {fid!r} registered twice")
        FINDINGS[fid] = Finding(fid, claim, rule, paper)
        return rule

    return deco


class Context:
    """What a finding's rule reads: `results` (results.json so far), `cfg`, and the roles of the
    study's methods: `sft` (the first SFT-on-expert-data method) and `rl` (the first method whose
    objective learns from rewards), each None when the study has none."""

    def __init__(self, results: dict, cfg: StudyConfig) -> None:
        self.results, self.cfg = results, cfg
        self.models, self.forgetting = results["models"], results["forgetting"]
        self.diagnostics, self.repairs = results["diagnostics"], results.get("repairs", {})
        self.base = self.models["base"]
        done = self.models
        self.sft = next((n for n, m in cfg.methods.items() if n in done and m.is_expert_sft), None)
        self.rl = next((n for n, m in cfg.methods.items() if n in done and m.is_rl), None)

    def gain(self, name: str, key: str) -> float:
        return self.models[name][key] - self.base[key]

    def missing(self, *roles: str) -> str:
        """Evidence text for a run that lacks the methods in `roles` ("sft", "rl")."""
        labels = {"sft": "SFT method", "rl": "RL method"}
        absent = [labels[r] for r in roles if getattr(self, r) is None]
        return "this run has no " + " and no ".join(absent)


def evaluate_findings(results: dict, cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every registered finding's verdict on `results`: [{id, claim, holds, evidence}] in order."""
    ctx = Context(results, cfg)
    out = []
    for f in FINDINGS.values():
        holds, evidence = f.rule(ctx)
        out.append({"id": f.id, "claim": f.claim, "holds": holds, "evidence": evidence})
    return out


def fmt3(x: float) -> str:
    return f"{x:.3f}"


# registration order is report order
from posttrain.findings import learning, weights, spectra, repairs, formats  # noqa: E402,F401
