"""The Stripe SDK client built from settings, and how its errors are classified."""

from __future__ import annotations

import enum
from functools import lru_cache

import stripe

from core.errors import NotImplementedByConfig
from core.settings import Settings


class Outcome(enum.Enum):
    RETRY = "retry"  # 429, 5xx, network: try again later, same identifier
    PERMANENT = "permanent"  # the request itself is wrong: never resend
    DUPLICATE = "duplicate"  # Stripe already holds an event with this identifier
    CREDENTIALS = "credentials"  # our key is wrong: nothing to do with the event
    SESSION = "session"  # v2 session token expired: open a new session


def require_configured(settings: Settings) -> None:
    if not settings.stripe_configured:
        raise NotImplementedByConfig(
            "Stripe is not configured on this server: set INFERATECH_STRIPE_API_KEY "
            "to enable billing"
        )


@lru_cache(maxsize=4)
def _client(key: str, api_base: str, meter_base: str, timeout: float) -> stripe.StripeClient:
    # The pusher retries on its own schedule with the same identifier: no SDK retries.
    return stripe.StripeClient(
        key,
        base_addresses={"api": api_base, "meter_events": meter_base},
        max_network_retries=0,
        http_client=stripe.HTTPXClient(timeout=timeout, allow_sync_methods=True),
    )


def client_for(settings: Settings) -> stripe.StripeClient:
    require_configured(settings)
    assert settings.stripe_api_key is not None
    return _client(
        settings.stripe_api_key.get_secret_value(),
        settings.stripe_api_base.rstrip("/"),
        (settings.stripe_meter_events_base or settings.stripe_api_base).rstrip("/"),
        settings.stripe_timeout_s,
    )


def classify(exc: stripe.StripeError) -> Outcome:
    """What a failed meter request means for the events it carried."""
    status = exc.http_status
    if isinstance(exc, stripe.TemporarySessionExpiredError):
        return Outcome.SESSION
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError):
        return Outcome.RETRY
    if status is None or status >= 500 or status in (408, 409, 429):
        return Outcome.RETRY
    if status in (401, 403):
        return Outcome.CREDENTIALS
    if exc.code == "resource_already_exists" or "already exists" in str(exc.user_message or ""):
        return Outcome.DUPLICATE
    return Outcome.PERMANENT


def describe(exc: stripe.StripeError) -> str:
    """A short, secret-free description for `last_error`."""
    status = exc.http_status if exc.http_status is not None else "network"
    message = exc.user_message or type(exc).__name__
    return f"{type(exc).__name__} ({status}): {message}"[:2000]
