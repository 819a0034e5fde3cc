"""The one exception tree; `api` maps it to the error envelope."""

from __future__ import annotations

from typing import Any, ClassVar


class InferatechError(Exception):
    """Base of every error a client may see."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    status_code: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}  # e.g. Retry-After on a 429


class InvalidRequest(InferatechError):
    code = "INVALID_REQUEST"
    status_code = 400


class PayloadTooLarge(InferatechError):
    code = "PAYLOAD_TOO_LARGE"
    status_code = 413


class AuthenticationFailed(InferatechError):
    code = "AUTHENTICATION_FAILED"
    status_code = 403


class AuthorizationFailed(InferatechError):
    code = "AUTHORIZATION_FAILED"
    status_code = 403


class NotFound(InferatechError):
    code = "NOT_FOUND"
    status_code = 404


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"


class KeyNotFound(NotFound):
    code = "KEY_NOT_FOUND"


class AccountNotFound(NotFound):
    code = "ACCOUNT_NOT_FOUND"


class RouterNotFound(NotFound):
    code = "ROUTER_NOT_FOUND"


class BatchNotFound(NotFound):
    code = "BATCH_NOT_FOUND"


class Conflict(InferatechError):
    code = "CONFLICT"
    status_code = 409


class ModelNotReady(Conflict):
    code = "MODEL_NOT_READY"


class UploadIncomplete(Conflict):
    code = "UPLOAD_INCOMPLETE"


class BillingInactive(InferatechError):
    code = "BILLING_INACTIVE"
    status_code = 403


class SignupDisabled(InferatechError):
    code = "SIGNUP_DISABLED"
    status_code = 403


class RateLimitExceeded(InferatechError):
    """A per-minute or concurrency limit of the key; `Retry-After` says when to come back."""

    code = "RATE_LIMIT_EXCEEDED"
    status_code = 429


class BudgetExceeded(RateLimitExceeded):
    """The key's monthly token budget is spent; it refills on the 1st (UTC)."""

    code = "BUDGET_EXCEEDED"


class ServiceUnavailable(InferatechError):
    code = "SERVICE_UNAVAILABLE"
    status_code = 503


class StorageError(ServiceUnavailable):
    """Object storage is unreachable or misbehaved."""


class NotImplementedByConfig(InferatechError):
    code = "NOT_CONFIGURED"
    status_code = 501


class ContextLengthExceeded(InvalidRequest):
    code = "CONTEXT_LENGTH_EXCEEDED"


class ChatTemplateMissing(InvalidRequest):
    """Messages sent to a model that has no chat template to render them."""

    code = "CHAT_TEMPLATE_MISSING"


class UnsupportedForModel(InvalidRequest):
    """An operation this model's format cannot do (embeddings of an ONNX model)."""

    code = "UNSUPPORTED_FOR_MODEL"


class InferenceFailed(InferatechError):
    code = "INFERENCE_FAILED"
    status_code = 500


class JobTimeout(InferatechError):
    code = "TIMEOUT"
    status_code = 504


class JobCancelled(Conflict):
    code = "JOB_CANCELLED"


class JobNotFound(NotFound):
    code = "JOB_NOT_FOUND"


class SessionNotFound(NotFound):
    code = "SESSION_NOT_FOUND"


class SessionBusy(Conflict):
    code = "SESSION_BUSY"


# Terminal error codes a worker reports → the exception the API raises for them.
JOB_ERRORS: dict[str, type[InferatechError]] = {
    "CONTEXT_LENGTH_EXCEEDED": ContextLengthExceeded,
    "INVALID_REQUEST": InvalidRequest,
    "TIMEOUT": JobTimeout,
    "JOB_CANCELLED": JobCancelled,
    "MODEL_NOT_READY": ModelNotReady,
    "CHAT_TEMPLATE_MISSING": ChatTemplateMissing,
    "UNSUPPORTED_FOR_MODEL": UnsupportedForModel,
    "SERVICE_UNAVAILABLE": ServiceUnavailable,  # the worker could not write the job's row
}


def job_error(code: str, message: str) -> InferatechError:
    return JOB_ERRORS.get(code, InferenceFailed)(message, details={"code": code})
