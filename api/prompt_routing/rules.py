"""Compiled routing rules: evaluated in order, the first match wins, else the default model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from api.prompt_routing.protocol import Rule
from api.prompt_routing.safe_regex import SafePattern, UnsafePattern
from api.prompt_routing.signals import LANGUAGES, detect_language, estimate_tokens
from core.errors import InvalidRequest


@dataclass(frozen=True)
class CompiledRule:
    model_id: str
    max_tokens: int | None
    min_tokens: int | None
    pattern: SafePattern | None
    language: str | None


class Signals:
    """A prompt's token estimate and language, each computed at most once."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self._tokens: int | None = None
        self._language: str | None = None

    @property
    def tokens(self) -> int:
        if self._tokens is None:
            self._tokens = estimate_tokens(self.prompt)
        return self._tokens

    @property
    def language(self) -> str:
        if self._language is None:
            self._language = detect_language(self.prompt)
        return self._language


def _holds(rule: CompiledRule, s: Signals) -> bool:
    if rule.max_tokens is not None and s.tokens > rule.max_tokens:
        return False
    if rule.min_tokens is not None and s.tokens < rule.min_tokens:
        return False
    if rule.language is not None and s.language != rule.language:
        return False
    return rule.pattern is None or rule.pattern.search(s.prompt)


class RuleSet:
    """A router's rules, ready to evaluate; immutable, so safe to share between threads."""

    def __init__(self, rules: list[CompiledRule], default_model_id: str) -> None:
        self.rules = rules
        self.default_model_id = default_model_id

    def choose(self, prompt: str) -> str:
        """The model of the first rule that holds for `prompt`, else the default."""
        signals = Signals(prompt)
        for rule in self.rules:
            if _holds(rule, signals):
                return rule.model_id
        return self.default_model_id


def compile_rules(rules: list[Rule], default_model_id: str) -> RuleSet:
    """Compile every rule; a bad regex or an unknown language is a 400 naming the rule."""
    compiled = []
    for i, rule in enumerate(rules):
        when = rule.when
        pattern = None
        if when.regex is not None:
            try:
                pattern = SafePattern(when.regex)
            except UnsafePattern as exc:
                raise InvalidRequest(
                    f"rules.{i}.when.regex: {exc}", details={"field": f"rules.{i}.when.regex"}
                ) from exc
        if when.language is not None and when.language not in LANGUAGES:
            raise InvalidRequest(
                f"rules.{i}.when.language: {when.language!r} is not one of {', '.join(LANGUAGES)}",
                details={"field": f"rules.{i}.when.language"},
            )
        bounds = (when.max_prompt_tokens, when.min_prompt_tokens)
        compiled.append(CompiledRule(rule.model_id, *bounds, pattern, when.language))
    return RuleSet(compiled, default_model_id)


@lru_cache(maxsize=1024)
def _cached(router_id: str, rules_json: str, default_model_id: str) -> RuleSet:
    rules = [Rule.model_validate(r) for r in json.loads(rules_json)]
    return compile_rules(rules, default_model_id)


def rule_set_of(router_id: str, rules: list[dict[str, Any]], default_model_id: str) -> RuleSet:
    """A stored router's compiled rules, compiled once per API process (routers never change)."""
    return _cached(router_id, json.dumps(rules, sort_keys=True), default_model_id)
