"""Per-tensor rules: the first regex that matches a tensor name decides what happens to it.

A rule is `REGEX=ACTION`, with ACTION one of
  ours | theirs | base | model:N   keep that side's tensor as is (ours = model 0, theirs = model 1)
  exclude                          leave the tensor out of the result
  STRATEGY[:k=v,k=v...]            merge it with another strategy or other parameters
Regexes use re.search (so `classifier` matches `roberta.classifier.dense.weight`); anchor with ^…$
when you mean the whole name. The split between REGEX and ACTION is the first '=' after which a valid
action follows, so regexes may themselves contain '=' (lookaheads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gittheta_merge.errors import UsageError

KEEP_ACTIONS = {"ours": 0, "theirs": 1}


@dataclass
class Rule:
    """One rule: pattern, action ('merge', 'keep', 'exclude'), and for merges a strategy and params."""

    pattern: str
    action: str = "merge"
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    keep: int | None = None  # model index to keep; -1 = base

    def __post_init__(self) -> None:
        try:
            self._regex = re.compile(self.pattern)
        except re.error as exc:
            raise UsageError(f"merge rule {self.pattern!r}: invalid regex ({exc})") from None

    def matches(self, name: str) -> bool:
        return self._regex.search(name) is not None

    def describe(self) -> str:
        if self.action == "keep":
            return {0: "ours", 1: "theirs", -1: "base"}.get(self.keep, f"model:{self.keep}")  # type: ignore[arg-type]
        if self.action == "exclude":
            return "exclude"
        extra = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.strategy}{':' + extra if extra else ''}"


def parse_action(pattern: str, text: str, known_strategies: set[str] | None = None) -> Rule | None:
    """A Rule for `text` as an action, or None if `text` is not a valid action."""
    text = text.strip()
    if text in KEEP_ACTIONS:
        return Rule(pattern, "keep", keep=KEEP_ACTIONS[text])
    if text == "base":
        return Rule(pattern, "keep", keep=-1)
    if text == "exclude":
        return Rule(pattern, "exclude")
    m = re.fullmatch(r"model:(\d+)", text)
    if m:
        return Rule(pattern, "keep", keep=int(m.group(1)))
    name, _, rest = text.partition(":")
    if known_strategies is None:
        from gittheta_merge.merge.strategies import registry

        known_strategies = set(registry())
    if name.replace("-", "_") not in known_strategies:
        return None
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in re.split(r",(?=[A-Za-z_][\w-]*=)", rest))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"merge rule {pattern!r}: parameter {item!r} is not key=value")
        params[key.strip()] = value.strip()
    return Rule(pattern, "merge", strategy=name.replace("-", "_"), params=params)


def parse_rule(text: str) -> Rule:
    """Parse `REGEX=ACTION` (see the module docstring)."""
    for pos in [i for i, ch in enumerate(text) if ch == "="]:
        rule = parse_action(text[:pos], text[pos + 1:])
        if rule is not None and text[:pos]:
            return rule
    raise UsageError(
        f"merge rule {text!r}: expected REGEX=ACTION with ACTION one of ours, theirs, base, model:N, "
        "exclude or STRATEGY[:k=v,...] (e.g. 'classifier=ours' or 'attn=ties:density=0.3')"
    )


def first_match(rules: list[Rule], name: str) -> Rule | None:
    for rule in rules:
        if rule.matches(name):
            return rule
    return None
