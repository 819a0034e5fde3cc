"""SQLModel tables and their public shapes. Timestamps are timezone-aware UTC."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.base import manager_of_class
from sqlalchemy.types import TypeDecorator
from sqlmodel import JSON, Column, Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always hands back aware datetimes (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: use core.tables.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


RowT = TypeVar("RowT", bound=SQLModel)


def construct(cls: type[RowT], **values: Any) -> RowT:
    """A new, unsaved row object, as `cls(**values)` makes it, in ~7 µs instead of ~120.

    Table models validate nothing on construction either way; SQLModel's own path runs each
    field through three `__setattr__` layers and asks `inspect` about every default factory.
    Here the values and defaults go straight into the instance's dict (which SQLAlchemy's
    state and pydantic share), so it is for trusted values only: the request's hot path
    builds its job this way (`tests/core/test_db.py` holds it equal to `cls(...)`).
    """
    if unknown := values.keys() - cls.model_fields.keys():
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    configure_mappers()  # as a first `cls(...)` would: a no-op once done
    row: RowT = manager_of_class(cls).new_instance()
    fields = row.__dict__
    for name, info in cls.model_fields.items():
        if name in values:
            fields[name] = values[name]
        elif info.default_factory is not None:
            fields[name] = info.default_factory()  # type: ignore[call-arg]
        else:
            fields[name] = info.default
    object.__setattr__(row, "__pydantic_fields_set__", set(values))
    object.__setattr__(row, "__pydantic_extra__", None)
    object.__setattr__(row, "__pydantic_private__", None)
    return row


def ts(*, nullable: bool = False, index: bool = False) -> Any:
    column: Column[datetime] = Column(UTCDateTime(), nullable=nullable, index=index)
    if nullable:
        return Field(default=None, sa_column=column)
    return Field(default_factory=utcnow, sa_column=column)


def enum_column(enum_cls: type[enum.StrEnum], *, index: bool = False) -> Any:
    """Store an enum by its value in a VARCHAR (no native enum: migrations stay simple)."""
    return sa.Column(
        sa.Enum(
            enum_cls,
            native_enum=False,
            create_constraint=False,
            length=20,
            values_callable=lambda e: [m.value for m in e],
        ),
        nullable=False,
        index=index,
    )


class ModelStatus(enum.StrEnum):
    AWAITING_UPLOAD = "awaiting_upload"
    VALIDATING = "validating"
    READY = "ready"
    REJECTED = "rejected"
    DELETED = "deleted"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class PushState(enum.StrEnum):
    PENDING = "pending"
    PUSHED = "pushed"
    FAILED = "failed"
    EXPIRED = "expired"


class Account(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=100)
    token_id: str = Field(unique=True, max_length=20)
    token_hash: str = Field(max_length=64)
    stripe_customer_id: str | None = Field(default=None, max_length=100, index=True)
    billing_status: str = Field(default="active", max_length=20)
    created_at: datetime = ts()


class Model(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="account.id", index=True, max_length=40)
    name: str = Field(max_length=100)
    status: ModelStatus = Field(
        default=ModelStatus.AWAITING_UPLOAD, sa_column=enum_column(ModelStatus, index=True)
    )
    format: str | None = Field(default=None, max_length=20)
    sha256: str | None = Field(default=None, max_length=64, index=True)
    total_bytes: int = Field(default=0, sa_type=sa.BigInteger)
    rejection_code: str | None = Field(default=None, max_length=60)
    rejection_message: str | None = Field(default=None, max_length=2000)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    key_delivered: bool = Field(default=False)
    created_at: datetime = ts()
    updated_at: datetime = ts()
    validation_started_at: datetime | None = ts(nullable=True)
    validated_at: datetime | None = ts(nullable=True)
    last_invoked_at: datetime | None = ts(nullable=True)
    deleted_at: datetime | None = ts(nullable=True)


class ModelFile(SQLModel, table=True):
    __tablename__ = "model_file"
    __table_args__ = (sa.UniqueConstraint("model_id", "path"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: str = Field(foreign_key="model.id", index=True, max_length=40)
    path: str = Field(max_length=255)
    size_bytes: int = Field(sa_type=sa.BigInteger)
    object_key: str = Field(max_length=400)
    upload_method: str = Field(default="put", max_length=20)
    upload_id: str | None = Field(default=None, max_length=400)
    part_size: int | None = Field(default=None, sa_type=sa.BigInteger)
    part_count: int = Field(default=0)
    uploaded: bool = Field(default=False)
    sha256: str | None = Field(default=None, max_length=64)
    kind: str | None = Field(default=None, max_length=30)
    # Set on a safetensors file the worker made from this pickle-based upload at validation;
    # runners load it, never the pickle (the pickle row stays, for the owner and deletion).
    converted_from: str | None = Field(default=None, max_length=255)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(primary_key=True, max_length=20)
    account_id: str = Field(foreign_key="account.id", index=True, max_length=40)
    model_id: str = Field(foreign_key="model.id", index=True, max_length=40)
    name: str = Field(default="default", max_length=100)
    secret_hash: str = Field(max_length=64)
    display_prefix: str = Field(max_length=60)
    billed_customer_id: str | None = Field(default=None, max_length=100)
    # A router-scoped key calls only its router (`model_id` is then the router's default).
    router_id: str | None = Field(default=None, foreign_key="router.id", index=True, max_length=40)
    # Limits set at mint; NULL means the server's default (`INFERATECH_RATE_LIMIT_*`), 0 none.
    rate_limit_rpm: int | None = Field(default=None)
    rate_limit_tpm: int | None = Field(default=None, sa_type=sa.BigInteger)
    rate_limit_concurrency: int | None = Field(default=None)
    monthly_token_budget: int | None = Field(default=None, sa_type=sa.BigInteger)
    log_payloads: bool = Field(default=False)
    created_at: datetime = ts()
    last_used_at: datetime | None = ts(nullable=True)
    revoked_at: datetime | None = ts(nullable=True)


class Job(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="account.id", index=True, max_length=40)
    model_id: str = Field(foreign_key="model.id", index=True, max_length=40)
    api_key_id: str | None = Field(default=None, foreign_key="api_key.id", max_length=20)
    router_id: str | None = Field(default=None, max_length=40)  # set when a router chose the model
    batch_id: str | None = Field(default=None, foreign_key="batch.id", index=True, max_length=40)
    status: JobStatus = Field(
        default=JobStatus.QUEUED, sa_column=enum_column(JobStatus, index=True)
    )
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    error_code: str | None = Field(default=None, max_length=60)
    error_message: str | None = Field(default=None, max_length=2000)
    prompt_tokens: int = Field(default=0)
    completion_tokens: int = Field(default=0)
    webhook_url: str | None = Field(default=None, max_length=2000)
    execution_timeout_s: int = Field(default=600)
    timings: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    attempts: int = Field(default=0)
    created_at: datetime = ts()
    expires_at: datetime | None = ts(nullable=True)
    purged_at: datetime | None = ts(nullable=True)
    started_at: datetime | None = ts(nullable=True)
    finished_at: datetime | None = ts(nullable=True)


class Router(SQLModel, table=True):
    """A prompt router: ordered rules, first match wins, else the default model."""

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="account.id", index=True, max_length=40)
    name: str = Field(max_length=100)
    rules: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    default_model_id: str = Field(foreign_key="model.id", max_length=40)
    created_at: datetime = ts()
    deleted_at: datetime | None = ts(nullable=True)


class Batch(SQLModel, table=True):
    """A set of jobs submitted together and run at low priority."""

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="account.id", index=True, max_length=40)
    api_key_id: str = Field(foreign_key="api_key.id", index=True, max_length=20)
    model_id: str = Field(max_length=40)  # as submitted: a model id or a router id
    total: int = Field(default=0)
    # [[custom_id, job_id], …] in request order: the order of the results file.
    items: list[list[str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    webhook_url: str | None = Field(default=None, max_length=2000)
    created_at: datetime = ts()
    cancelled_at: datetime | None = ts(nullable=True)
    finished_at: datetime | None = ts(nullable=True)


class UsageEvent(SQLModel, table=True):
    __tablename__ = "usage_event"

    id: str = Field(primary_key=True, max_length=40)
    job_id: str = Field(foreign_key="job.id", unique=True, max_length=40)
    account_id: str = Field(foreign_key="account.id", index=True, max_length=40)
    api_key_id: str | None = Field(default=None, max_length=20)
    model_id: str = Field(max_length=40, index=True)
    stripe_customer_id: str | None = Field(default=None, max_length=100)
    prompt_tokens: int = Field(default=0)
    completion_tokens: int = Field(default=0)
    occurred_at: datetime = ts(index=True)
    push_state: PushState = Field(
        default=PushState.PENDING, sa_column=enum_column(PushState, index=True)
    )
    attempts: int = Field(default=0)
    last_error: str | None = Field(default=None, max_length=2000)
    # The pusher's lease: a claimed event is skipped by other pushers until claimed_until.
    claim_token: str | None = Field(default=None, max_length=40, index=True)
    claimed_until: datetime | None = ts(nullable=True)
    next_attempt_at: datetime | None = ts(nullable=True)
    pushed_at: datetime | None = ts(nullable=True)


class BillingCustomer(SQLModel, table=True):
    """A Stripe customer's subscription state, as last told by Stripe's webhooks."""

    __tablename__ = "billing_customer"

    id: str = Field(primary_key=True, max_length=100)  # cus_…
    status: str = Field(default="active", max_length=30)
    subscription_id: str | None = Field(default=None, max_length=100)
    # The Stripe `created` time of the event that set `status`: older events never override.
    status_at: datetime | None = ts(nullable=True)
    cancelled_subscription_ids: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    updated_at: datetime = ts()


class ProcessedWebhookEvent(SQLModel, table=True):
    __tablename__ = "processed_webhook_event"

    id: str = Field(primary_key=True, max_length=100)
    type: str = Field(max_length=100)
    processed_at: datetime = ts()
