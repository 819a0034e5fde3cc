"""Request and response models of `/v1/routers`."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from api.prompt_routing.safe_regex import MAX_PATTERN_CHARS

MAX_RULES = 32
MAX_TOKENS_BOUND = 10_000_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuleWhen(Strict):
    """Conditions of one rule; every condition given must hold."""

    max_prompt_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS_BOUND)
    min_prompt_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS_BOUND)
    regex: str | None = Field(default=None, min_length=1, max_length=MAX_PATTERN_CHARS)
    language: str | None = Field(default=None, min_length=2, max_length=3)

    @model_validator(mode="after")
    def _one_condition_at_least(self) -> RuleWhen:
        if not self.model_dump(exclude_none=True):
            raise ValueError(
                "give at least one of max_prompt_tokens, min_prompt_tokens, regex, language"
            )
        return self


class Rule(Strict):
    when: RuleWhen
    model_id: str = Field(min_length=1, max_length=40)


class RouterCreate(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w.-]*$")
    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)
    default_model_id: str = Field(min_length=1, max_length=40)


class RouterPublic(BaseModel):
    id: str
    name: str
    rules: list[Rule]
    default_model_id: str
    created_at: datetime


class RoutersPublic(BaseModel):
    data: list[RouterPublic]
    count: int
