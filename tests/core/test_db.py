"""Database behaviour on both engines: SQLite (embedded) and the PostgreSQL server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from core.db import get_engine, migrate
from core.ids import new_id
from core.settings import Settings
from core.tables import (
    Account,
    Job,
    JobStatus,
    Model,
    ModelFile,
    ModelStatus,
    ProcessedWebhookEvent,
    UsageEvent,
    construct,
)
from tests.conftest import make_settings
from tests.utils.stack import ROOT


@pytest.fixture(params=["sqlite", "postgres"])
def db_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield make_settings(tmp_path)
        return
    url: str = request.getfixturevalue("postgres_url")
    settings = make_settings(tmp_path, database_url=url)
    yield settings


@pytest.fixture
def session(db_settings: Settings) -> Iterator[Session]:
    migrate(db_settings)
    with Session(get_engine(db_settings), expire_on_commit=False) as s:
        yield s


def _account(session: Session) -> Account:
    acct = Account(id=new_id("acct"), name="a", token_id=new_id("t")[:20], token_hash="h" * 64)
    session.add(acct)
    session.commit()
    return acct


def _model(session: Session, acct: Account) -> Model:
    model = Model(id=new_id("mdl"), account_id=acct.id, name="m")
    session.add(model)
    session.commit()
    return model


def test_migrate_twice_is_a_noop(db_settings: Settings) -> None:
    migrate(db_settings)
    migrate(db_settings)
    tables = set(sa.inspect(get_engine(db_settings)).get_table_names())
    expected = {
        "account",
        "model",
        "model_file",
        "api_key",
        "job",
        "usage_event",
        "processed_webhook_event",
    }
    assert expected <= tables


def test_timestamps_round_trip_as_aware_utc(session: Session) -> None:
    acct = _account(session)
    session.expire_all()
    loaded = session.get(Account, acct.id)
    assert loaded is not None
    assert loaded.created_at.tzinfo is not None
    assert loaded.created_at.utcoffset() == timedelta(0)
    assert abs(loaded.created_at - datetime.now(UTC)) < timedelta(minutes=5)


def test_non_utc_timestamp_is_stored_as_the_same_instant(session: Session) -> None:
    acct = _account(session)
    model = _model(session, acct)
    oslo = datetime(2026, 11, 22, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    model.validated_at = oslo
    session.add(model)
    session.commit()
    session.expire_all()
    loaded = session.get(Model, model.id)
    assert loaded is not None and loaded.validated_at == oslo
    assert loaded.validated_at.utcoffset() == timedelta(0)


def test_naive_timestamp_is_refused(session: Session) -> None:
    acct = _account(session)
    model = _model(session, acct)
    model.validated_at = datetime(2026, 1, 1)
    session.add(model)
    with pytest.raises(sa.exc.StatementError, match="naive"):
        session.commit()
    session.rollback()


def test_enum_status_round_trips_by_value(session: Session) -> None:
    acct = _account(session)
    model = _model(session, acct)
    model.status = ModelStatus.VALIDATING
    session.add(model)
    session.commit()
    raw = session.connection().execute(
        sa.text("SELECT status FROM model WHERE id = :i"), {"i": model.id}
    )
    assert raw.scalar_one() == "validating"


def test_usage_event_is_unique_per_job(session: Session) -> None:
    acct = _account(session)
    model = _model(session, acct)
    job = Job(id=new_id("job"), account_id=acct.id, model_id=model.id)
    session.add(job)
    session.commit()
    session.add(UsageEvent(id=new_id("ue"), job_id=job.id, account_id=acct.id, model_id=model.id))
    session.commit()
    session.add(UsageEvent(id=new_id("ue"), job_id=job.id, account_id=acct.id, model_id=model.id))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


def test_processed_webhook_event_is_unique(session: Session) -> None:
    session.add(ProcessedWebhookEvent(id="evt_1", type="invoice.paid"))
    session.commit()
    session.add(ProcessedWebhookEvent(id="evt_1", type="invoice.paid"))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


def test_model_file_paths_unique_within_model(session: Session) -> None:
    acct = _account(session)
    model = _model(session, acct)
    for _ in range(2):
        session.add(ModelFile(model_id=model.id, path="a.gguf", size_bytes=1, object_key="k"))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


def test_foreign_keys_are_enforced(session: Session) -> None:
    session.add(Model(id=new_id("mdl"), account_id="acct_missing", name="m"))
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()


def _job_values(acct: Account, model: Model) -> dict[str, object]:
    return {
        "id": new_id("job"),
        "account_id": acct.id,
        "model_id": model.id,
        "params": {"prompt": "hi", "max_tokens": 8},
        "execution_timeout_s": 30,
        "expires_at": datetime.now(UTC) + timedelta(hours=1),
    }


def test_construct_makes_the_row_the_constructor_makes(session: Session) -> None:
    """The hot path's `construct` (values straight into the instance) against `Job(...)`:
    every field and default equal, the same dump, and it inserts, updates and reads back."""
    acct = _account(session)
    model = _model(session, acct)
    values = _job_values(acct, model)
    slow, fast = Job(**values), construct(Job, **values)  # type: ignore[arg-type]
    assert fast.model_fields_set == slow.model_fields_set
    created = abs((fast.created_at - slow.created_at).total_seconds())
    assert created < 5 and fast.created_at.tzinfo is not None  # default factory ran
    fast.created_at = slow.created_at
    assert fast.model_dump() == slow.model_dump()
    session.add(fast)
    session.commit()
    fast.status, fast.attempts = JobStatus.RUNNING, 1  # tracked like any row's change
    session.commit()
    session.expunge_all()
    row = session.get(Job, fast.id)
    assert row is not None and row.params == values["params"]
    assert (row.status, row.attempts, row.execution_timeout_s) == (JobStatus.RUNNING, 1, 30)
    with pytest.raises(TypeError, match="no field colour"):
        construct(Job, colour="red", **values)


def test_construct_in_a_fresh_process_configures_the_mappers_first() -> None:
    """A worker's first job is built by `construct` before any `Job(...)` or query ran:
    its attributes must read (unconfigured mappers have no attribute implementations)."""
    code = (
        "from core.tables import Job, JobStatus, construct\n"
        "job = construct(Job, id='job_x', account_id='a', model_id='m', params={'p': 1})\n"
        "assert (job.id, job.status, job.params, job.attempts) == "
        "('job_x', JobStatus.QUEUED, {'p': 1}, 0)\n"
        "job.attempts = 1\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
