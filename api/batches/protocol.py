"""Request and response models of `/v1/batches`."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from api.inference.protocol import GenerationParams, JobError, JobStatusName

BatchStatus = Literal["queued", "running", "completed", "cancelled"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class BatchRequest(GenerationParams):
    """One request of a batch: a prompt or chat messages, and generation options.

    `messages` go through the model's chat template like `/openai/v1/chat/completions`; a
    prompt is one user turn (or verbatim with `raw`), as in `/v1/infer`.
    """

    custom_id: str = Field(min_length=1, max_length=64)
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1000)

    def routing_text(self) -> str:
        """What a prompt router looks at: the prompt, or every message's text."""
        if self.messages is not None:
            return "\n".join(m.content for m in self.messages)
        return self.prompt or ""


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=40, description="a model id or a router id")
    requests: list[BatchRequest] = Field(min_length=1)
    webhook_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://[^\s/]+")


class BatchCreated(BaseModel):
    id: str
    status: BatchStatus
    total: int


class BatchPublic(BaseModel):
    id: str
    model_id: str
    status: BatchStatus
    total: int
    pending: int  # queued or running
    completed: int  # succeeded
    failed: int  # failed or timed out
    cancelled: int
    created_at: datetime
    cancelled_at: datetime | None = None
    finished_at: datetime | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BatchResult(BaseModel):
    completion: str
    finish_reason: str


class BatchResultLine(BaseModel):
    """One line of `GET /v1/batches/{id}/results`, in request order."""

    custom_id: str
    job_id: str
    status: JobStatusName
    routed_to: str | None = None
    result: BatchResult | None = None
    error: JobError | None = None
    usage: Usage
