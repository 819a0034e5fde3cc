"""Builds the FastAPI application; nothing else."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import openapi, redaction
from api.batches import router as batches
from api.errors import RequestIdMiddleware, install_error_handlers
from api.inference import router as inference
from api.inference import sessions, ws
from api.inference.auth_cache import AuthCache
from api.inference.routing import WorkerDirectory
from api.metrics import AccessMiddleware, make_registry
from api.openai import errors as openai_errors
from api.openai import router as openai
from api.prompt_routing import router as prompt_routers
from api.routes import (
    accounts,
    billing,
    health,
    keys,
    metrics,
    models,
    storage_events,
    uploads,
    workers,
)
from core import logs
from core.queue import make_celery
from core.redis import get_redis, make_async_redis
from core.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_level, settings.effective_log_format)
    logs.propagate_to_celery()
    redaction.install()
    # `inferatech.access` logs each request (route template, status, duration, request id);
    # uvicorn's own access line would only repeat it, raw path and query included.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.aredis = make_async_redis(settings)
        app.state.workers = WorkerDirectory(get_redis(settings))
        try:
            yield
        finally:
            await app.state.aredis.aclose()

    app = FastAPI(title="Inferatech", version="0.1.0", lifespan=lifespan)
    app.state.celery = make_celery(settings)
    app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s, settings.auth_cache_max_entries)
    app.state.metrics_registry, http_metrics = make_registry(settings)
    app.add_middleware(AccessMiddleware, metrics=http_metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every line and metric has the id
    install_error_handlers(app, shapes={openai_errors.PREFIX: openai_errors.openai_error})
    # Starlette tries routes in order and no two routers share a path: the per-request
    # routes go first (matching `/v1/infer` last cost ~0.3 ms of CPU on a small VM).
    routers = (
        inference,
        openai,  # /openai/v1, errors in OpenAI's shape
        sessions,
        ws,
        health,
        metrics,
        accounts,
        models,
        keys,
        uploads,
        storage_events,
        workers,
        billing,
        prompt_routers,
        batches,
    )
    for module in routers:
        app.include_router(module.router)
    openapi.install(app)
    return app


def app_factory() -> FastAPI:
    """`uvicorn --factory api.main:app_factory`."""
    return create_app()
