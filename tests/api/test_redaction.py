from __future__ import annotations

import logging

import pytest

from api import redaction
from api.main import create_app
from tests.conftest import make_settings


def test_access_log_line_never_contains_upload_token(
    caplog: pytest.LogCaptureFixture, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    create_app(make_settings(tmp_path, redis_url="redis://127.0.0.1:6379/0"))
    access = logging.getLogger("uvicorn.access")
    token = "eyJrZXkiOiJhY2N0In0.c2lnbmF0dXJl"
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        access.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "PUT", f"/v1/uploads/{token}", "1.1", 200
        )
    assert token not in caplog.text
    assert "/v1/uploads/<redacted>" in caplog.text


def test_redact_leaves_other_paths_alone() -> None:
    assert redaction.redact("/v1/models/mdl_1") == "/v1/models/mdl_1"
    assert redaction.redact("PUT /v1/uploads/abc.def?x=1") == "PUT /v1/uploads/<redacted>?x=1"
