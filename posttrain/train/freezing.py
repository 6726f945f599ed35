"""Which parameters train: freeze by name pattern and layer range, or train only a subset.

Rule syntax:  PATTERN[@LAYERS]
  PATTERN  a glob over parameter names (``*.mlp.*``) or a regular expression after ``re:``
           (``re:q_proj|k_proj``, matched with `re.search`);
  LAYERS   ``A-B`` (inclusive) or ``A``: the rule only applies to parameters of those layers.
`train_only` rules freeze everything they do not match; `freeze` rules then freeze what they match.
A rule that matches no parameter is an error, so a typo cannot silently train the whole model.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from posttrain.analysis.checkpoints import classify
from posttrain.errors import UserError


@dataclass(frozen=True)
class Rule:
    text: str
    pattern: str
    regex: bool
    layers: tuple[int, int] | None

    def matches(self, name: str) -> bool:
        hit = re.search(self.pattern, name) is not None if self.regex else fnmatch.fnmatchcase(name, self.pattern)
        if not hit or self.layers is None:
            return hit
        layer = classify(name).layer
        return layer is not None and self.layers[0] <= layer <= self.layers[1]


def parse_rule(text: str) -> Rule:
    body, layers = text, None
    if "@" in text:
        body, _, spec = text.rpartition("@")
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", spec.strip())
        if not m:
            raise UserError(f"freeze rule {text!r}: layer range must be A or A-B, got {spec!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UserError(f"freeze rule {text!r}: empty layer range {lo}-{hi}")
        layers = (lo, hi)
    regex = body.startswith("re:")
    pattern = body[3:] if regex else body
    if not pattern:
        raise UserError(f"freeze rule {text!r} has an empty pattern")
    if regex:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"freeze rule {text!r}: bad regular expression ({e})") from None
    return Rule(text, pattern, regex, layers)


@dataclass
class FreezeReport:
    trainable: int
    total: int
    frozen_names: list[str]


def apply_freezing(model: nn.Module, freeze: list[str] = (), train_only: list[str] = ()) -> FreezeReport:
    """Set `requires_grad` on `model`'s parameters from the rules; returns the counts."""
    names = [n for n, _ in model.named_parameters()]
    freeze_rules = [parse_rule(t) for t in freeze]
    only_rules = [parse_rule(t) for t in train_only]
    for rule in freeze_rules + only_rules:
        if not any(rule.matches(n) for n in names):
            raise UserError(f"freeze rule {rule.text!r} matches no parameter (e.g. {names[0]})")
    frozen = []
    for name, p in model.named_parameters():
        train = not only_rules or any(r.matches(name) for r in only_rules)
        if any(r.matches(name) for r in freeze_rules):
            train = False
        p.requires_grad_(train)
        if not train:
            frozen.append(name)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise UserError("freezing rules leave no trainable parameter")
    return FreezeReport(trainable, total, frozen)
