"""Per-model prices per 1K prompt and completion tokens, with a default by size class."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from core.settings import GiB, Settings

SMALL_BELOW = 1 * GiB
MEDIUM_BELOW = 8 * GiB
THOUSAND = Decimal(1000)


@dataclass(frozen=True)
class Price:
    prompt_per_1k: Decimal
    completion_per_1k: Decimal

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (
            self.prompt_per_1k * prompt_tokens + self.completion_per_1k * completion_tokens
        ) / THOUSAND


def size_class(total_bytes: int) -> str:
    if total_bytes < SMALL_BELOW:
        return "small"
    return "medium" if total_bytes < MEDIUM_BELOW else "large"


def _price(entry: dict[str, float]) -> Price:
    return Price(Decimal(str(entry.get("prompt", 0))), Decimal(str(entry.get("completion", 0))))


def price_for(settings: Settings, model_id: str, total_bytes: int) -> Price:
    """The model's own price if one is set, else its size class's."""
    entry = settings.billing_model_prices.get(model_id)
    if entry is None:
        entry = settings.billing_class_prices.get(size_class(total_bytes), {})
    return _price(entry)
