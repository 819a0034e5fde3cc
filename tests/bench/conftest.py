"""Benchmarks reuse the billing fixtures (databases, fake Stripe server)."""

from tests.billing.conftest import billing_db, billing_pg_url, fake_stripe, settings

__all__ = ["billing_db", "billing_pg_url", "fake_stripe", "settings"]
