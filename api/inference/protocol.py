"""Request and response models of `/v1/infer` and `/v1/jobs`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled", "timed_out"]


class GenerationParams(BaseModel):
    """How to generate: shared by `/v1/infer`, `/v1/jobs` and each request of a batch."""

    model_config = ConfigDict(extra="forbid")

    raw: StrictBool = False
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, allow_inf_nan=False)
    max_tokens: StrictInt = Field(default=200, ge=1)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: StrictInt = Field(default=40, ge=0, le=1000)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        if any(not s or len(s) > 64 for s in value):
            raise ValueError("each stop string must be 1 to 64 characters")
        return value


class InferRequest(GenerationParams):
    model_id: str = Field(min_length=1, max_length=40)
    prompt: str = Field(min_length=1)
    api_key: str | None = Field(default=None, max_length=200, description="prefer the header")
    stream: StrictBool = False
    session_id: str | None = Field(
        default=None, pattern=r"^ses_[A-Za-z0-9]{1,40}$", description="continue a chain session"
    )


class JobCreate(InferRequest):
    webhook_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^\s/]+")
    execution_timeout_s: StrictInt | None = Field(default=None, ge=1)
    ttl_s: StrictInt | None = Field(default=None, ge=1, le=7 * 24 * 3600)


class InferResponse(BaseModel):
    id: str
    model_id: str
    completion: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens_used: int
    latency_ms: float
    routed_to: str | None = None  # the model a router chose (the call named a router)


class JobCreated(BaseModel):
    id: str
    status: JobStatusName
    routed_to: str | None = None


class JobError(BaseModel):
    code: str
    message: str


class JobTimings(BaseModel):
    queue_ms: float | None = None
    cold_start_ms: float | None = None
    run_ms: float | None = None


class JobPublic(BaseModel):
    id: str
    model_id: str
    router_id: str | None = None
    routed_to: str | None = None
    batch_id: str | None = None
    status: JobStatusName
    result: InferResponse | None = None
    error: JobError | None = None
    timings: JobTimings
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
