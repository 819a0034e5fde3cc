"""The OpenAI-compatible routes' work: which model, which job, and answers in OpenAI's shape.

Jobs are the same as `/v1/infer`'s (same queue, worker, usage ledger); only the way they are
described and answered differs. No FastAPI here.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlmodel import Session, col, select

from api.inference.auth import authenticate_key, grant_for
from api.inference.auth_cache import AuthCache, Grant
from api.inference.serving import JobSpec, Outcome
from api.openai.errors import error_type
from api.openai.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ModelCard,
    Usage,
)
from api.prompt_routing.resolve import Target, resolve_target
from api.prompt_routing.service import is_router_id
from core import keys
from core.errors import InvalidRequest, ModelNotFound, job_error
from core.queue import EMBED_OP
from core.settings import Settings
from core.tables import ApiKey, JobStatus, Model, ModelStatus

Authorize = Callable[[Session, AuthCache], Grant | Target]


def authorizer(settings: Settings, token: str, model: str, text: str = "") -> Authorize:
    """The grant for `model`: a model id, the name of a model in the key's account, or a
    prompt router's id (which picks a model by `text`)."""

    def authorize(session: Session, cache: AuthCache) -> Grant | Target:
        if is_router_id(model):
            return resolve_target(session, settings, cache, token, model, text)
        if (known := cached_model_id(cache, token, model)) is not None:  # id or name seen
            return grant_for(session, settings, cache, token, known)
        try:
            return grant_for(session, settings, cache, token, model)
        except ModelNotFound:
            named = _model_named(session, authenticate_key(session, settings, token), model)
            if named is None:
                raise ModelNotFound(f"The model {model!r} does not exist") from None
            return grant_for(session, settings, cache, token, named)

    return authorize


def cached_model_id(cache: AuthCache, token: str, model: str) -> str | None:
    """The model `model` names (its id, or its name as the key's own model has it), as the
    key's cached grant says; None when the grant is not cached (the database decides)."""
    parsed = keys.parse(token, keys.API_KEY_PREFIX)
    cached = cache.get(parsed.key_id) if parsed else None
    if cached is None or model not in (cached.model_id, cached.model_name):
        return None
    return cached.model_id


def _model_named(session: Session, key: ApiKey, name: str) -> str | None:
    """The key's own model if it has this name, else the account's newest one that does."""
    stmt = (
        select(Model.id)
        .where(Model.account_id == key.account_id, Model.name == name)
        .where(col(Model.status) != ModelStatus.DELETED)
        .order_by(col(Model.created_at).desc())
    )
    ids = list(session.exec(stmt))
    return key.model_id if key.model_id in ids else next(iter(ids), None)


def routing_text(spec: JobSpec) -> str:
    """What a prompt router looks at: the prompt, the messages' text or the inputs."""
    params = spec.params
    if "messages" in params:
        return "\n".join(str(m["content"]) for m in params["messages"])
    if "input" in params:
        return "\n".join(str(i) for i in params["input"])
    return str(params.get("prompt", ""))


def key_models(session: Session, settings: Settings, token: str) -> list[ModelCard]:
    """The models this key may call: its one model, once it is ready."""
    model = _ready_model_of(session, settings, token)
    return [card(model)] if model else []


def key_model(session: Session, settings: Settings, token: str, name: str) -> ModelCard:
    """One model this key may call, by id or name; any other is missing."""
    model = _ready_model_of(session, settings, token)
    if model is None or name not in (model.id, model.name):
        raise ModelNotFound(f"The model {name!r} does not exist")
    return card(model)


def _ready_model_of(session: Session, settings: Settings, token: str) -> Model | None:
    key = authenticate_key(session, settings, token)
    model = session.get(Model, key.model_id)
    return model if model is not None and model.status is ModelStatus.READY else None


def card(model: Model) -> ModelCard:
    created = int(model.created_at.timestamp())
    return ModelCard(id=model.id, created=created, owned_by=model.account_id)


# --- job specs ----------------------------------------------------------------------------


def _sampling(body: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> dict[str, Any]:
    return {
        "temperature": body.temperature,
        "top_p": max(body.top_p, 1e-6),  # OpenAI allows 0: keep only the likeliest token
        "top_k": 0,  # OpenAI has no top-k
        "stop": body.stop,
        "seed": None if body.seed is None else body.seed % 2**63,
        "max_tokens": max_tokens,
    }


def chat_spec(body: ChatCompletionRequest, settings: Settings) -> JobSpec:
    messages = [{"role": m.template_role(), "content": m.text()} for m in body.messages]
    limit = body.limit() or settings.max_completion_tokens
    return JobSpec(
        params={"messages": messages, **_sampling(body, limit)},
        input_chars=sum(len(m["content"]) for m in messages),
        input_name="messages",
        max_tokens=limit,
        session_id=body.session_id,
    )


def completion_spec(body: CompletionRequest, settings: Settings) -> JobSpec:
    limit = body.max_tokens or settings.max_completion_tokens
    prompt = body.text()
    return JobSpec(
        params={"prompt": prompt, "raw": True, **_sampling(body, limit)},
        input_chars=len(prompt),
        max_tokens=limit,
    )


def embedding_spec(body: EmbeddingRequest, settings: Settings) -> JobSpec:
    texts = body.texts()
    if len(texts) > settings.max_embedding_inputs:
        raise InvalidRequest(
            f"input has {len(texts)} texts; at most {settings.max_embedding_inputs} per request",
            details={"errors": [{"field": "input", "message": "too many inputs"}]},
        )
    return JobSpec(
        params={"op": EMBED_OP, "input": texts},
        input_chars=sum(len(t) for t in texts),
        input_name="input",
    )


# --- answers ------------------------------------------------------------------------------


def result_of(outcome: Outcome) -> dict[str, Any]:
    """The finished job's result, or the error its terminal event carries, raised."""
    done = outcome.done or {}
    if done.get("status") != JobStatus.SUCCEEDED.value:
        error = done.get("error") or {"code": "INFERENCE_FAILED", "message": "job failed"}
        raise job_error(error["code"], error["message"])
    result: dict[str, Any] = done["result"]
    return result


def usage_of(result: dict[str, Any]) -> Usage:
    prompt, completion = result["prompt_tokens"], result["completion_tokens"]
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def chat_completion(job_id: str, model: str, outcome: Outcome) -> ChatCompletion:
    result = result_of(outcome)
    return ChatCompletion(
        id=f"chatcmpl-{job_id}",
        created=int(time.time()),
        model=model,
        choices=[
            ChatChoice(
                message=ChatMessageOut(content="".join(outcome.text)),
                finish_reason=result["finish_reason"],
            )
        ],
        usage=usage_of(result),
    )


def completion(job_id: str, model: str, outcome: Outcome) -> Completion:
    result = result_of(outcome)
    choice = CompletionChoice(text="".join(outcome.text), finish_reason=result["finish_reason"])
    return Completion(
        id=f"cmpl-{job_id}",
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=usage_of(result),
    )


def embedding_list(model: str, outcome: Outcome, encoding: str) -> EmbeddingList:
    result = result_of(outcome)
    vectors: list[list[float]] = result["embeddings"]
    data = [
        EmbeddingData(index=i, embedding=_b64(v) if encoding == "base64" else v)
        for i, v in enumerate(vectors)
    ]
    tokens = result["prompt_tokens"]
    return EmbeddingList(
        data=data, model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )


def _b64(vector: list[float]) -> str:
    """Little-endian float32, as OpenAI's `encoding_format="base64"` (the SDKs' default)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# --- streams ------------------------------------------------------------------------------


class ChunkWriter:
    """Turns job events into OpenAI stream chunks (chat or legacy completion)."""

    def __init__(self, job_id: str, model: str, *, chat: bool, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self.base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._started = False

    def chunks(self, event: dict[str, Any]) -> Iterator[dict[str, Any]]:
        kind = event.get("type")
        if kind == "token":
            yield from self._opening()
            yield self._chunk(event["text"], None)
        elif kind == "done":
            if event.get("status") != JobStatus.SUCCEEDED.value:
                error = event.get("error") or {"code": "INFERENCE_FAILED", "message": "failed"}
                yield {"error": _stream_error(error)}
                return
            yield from self._opening()
            result = event["result"]
            yield self._chunk("", result["finish_reason"])
            if self.include_usage:
                yield {**self.base, "choices": [], "usage": usage_of(result).model_dump()}

    def _opening(self) -> Iterator[dict[str, Any]]:
        # A chat stream's first chunk names the role, as OpenAI's does.
        if self.chat and not self._started:
            yield self._chunk("", None, role=True)
        self._started = True

    def _chunk(self, text: str, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if not role and (text or finish is None):
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
        choice["logprobs"] = None
        chunk: dict[str, Any] = {**self.base, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk


def _stream_error(error: dict[str, Any]) -> dict[str, Any]:
    """A failure after the stream began: OpenAI's error object as a last `data:` line."""
    status = job_error(error["code"], error["message"]).status_code
    return {
        "message": error["message"],
        "type": error_type(status),
        "param": None,
        "code": error["code"],
    }
