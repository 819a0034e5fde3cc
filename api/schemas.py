"""Request and response models of the REST API (never table objects)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .@+-]+$")
    # Operator token only: the Stripe customer this account's usage is billed to.
    stripe_customer_id: str | None = Field(default=None, max_length=100)


class AccountCreated(BaseModel):
    id: str
    name: str
    token: str
    created_at: datetime
    stripe_customer_id: str | None = None


class CustomerLink(Strict):
    """`cus_…` to bill from now on, or null to unlink."""

    stripe_customer_id: str | None = Field(max_length=100)


class CustomerLinked(BaseModel):
    id: str
    stripe_customer_id: str | None


class FileDecl(Strict):
    path: str = Field(min_length=1, max_length=255)
    size_bytes: StrictInt = Field(ge=1)


class ModelCreate(Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w.-]*$")
    files: list[FileDecl] = Field(min_length=1)


class PartUrlPublic(BaseModel):
    part_number: int
    url: str


class UploadPublic(BaseModel):
    path: str
    method: Literal["put", "multipart"]
    url: str | None = None
    headers: dict[str, str] = {}
    upload_id: str | None = None
    part_size: int | None = None
    parts: list[PartUrlPublic] = []
    expires_at: datetime


class ModelFilePublic(BaseModel):
    path: str
    size_bytes: int
    uploaded: bool
    sha256: str | None = None
    kind: str | None = None
    converted_from: str | None = Field(
        default=None,
        description="set on safetensors the platform converted from this pickle-based upload",
    )


class Rejection(BaseModel):
    code: str
    message: str


class ModelPublic(BaseModel):
    id: str
    name: str
    status: str
    format: str | None
    sha256: str | None
    total_bytes: int
    files: list[ModelFilePublic]
    rejection: Rejection | None = None
    created_at: datetime
    updated_at: datetime
    validated_at: datetime | None = None
    api_key: str | None = Field(
        default=None, description="the model's first API key, in plaintext exactly once"
    )
    api_key_prefix: str | None = None


class ModelCreated(ModelPublic):
    uploads: list[UploadPublic]


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class CompletedPartIn(Strict):
    part_number: StrictInt = Field(ge=1, le=10000)
    etag: str = Field(min_length=1, max_length=200)


class ModelComplete(Strict):
    parts: dict[str, list[CompletedPartIn]] = Field(default_factory=dict, max_length=64)


class KeyCreate(Strict):
    """A new key; limits left out (null) follow the server's defaults, 0 means unlimited.

    The server's defaults are also the ceiling: an account can tighten a key, not loosen it.
    """

    name: str = Field(default="default", min_length=1, max_length=100)
    rate_limit_rpm: StrictInt | None = Field(default=None, ge=0, le=10_000_000)
    rate_limit_tpm: StrictInt | None = Field(default=None, ge=0, le=10_000_000_000)
    rate_limit_concurrency: StrictInt | None = Field(default=None, ge=0, le=100_000)
    monthly_token_budget: StrictInt | None = Field(default=None, ge=1, le=10**15)
    log_payloads: StrictBool = False


class KeyPublic(BaseModel):
    id: str
    name: str
    model_id: str
    router_id: str | None = None  # set: the key calls this router only
    prefix: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    rate_limit_concurrency: int | None = None
    monthly_token_budget: int | None = None
    log_payloads: bool = False


class KeyCreated(KeyPublic):
    key: str


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int


class UploadReceived(BaseModel):
    etag: str
    size: int
