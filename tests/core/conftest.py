"""Fixtures for the object-storage backends: a fake clock, local and S3 (moto_server) storage."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from core.settings import Settings
from core.storage import get_storage
from core.storage.local import LocalStorage
from core.storage.s3 import S3Storage
from tests.conftest import SECRETS

MiB = 1024 * 1024


class FakeClock:
    """A `time.time` stand-in that only moves when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def storage_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Test settings with 5 MiB multipart (S3's minimum) so multipart tests stay small."""
    values: dict[str, Any] = {
        "environment": "test",
        "data_dir": data_dir,
        "public_base_url": "http://testserver",
        **SECRETS,
        "multipart_threshold_bytes": 5 * MiB,
        "multipart_part_size": 5 * MiB,
        **overrides,
    }
    return Settings(**values)


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def token_of(url: str | None) -> str:
    assert url is not None and "/v1/uploads/" in url
    return url.rsplit("/", 1)[1]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def local_storage(tmp_path: Path, clock: FakeClock) -> LocalStorage:
    return LocalStorage(tmp_path / "objects", storage_settings(tmp_path), now=clock)


@pytest.fixture
def s3_settings(tmp_path: Path, moto_endpoint: str) -> Settings:
    # A bucket per test: no test sees another's objects or pending uploads.
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    return storage_settings(
        tmp_path, storage_url=f"s3://{bucket}/models", s3_endpoint_url=moto_endpoint
    )


@pytest.fixture
def s3_storage(s3_settings: Settings) -> S3Storage:
    storage = get_storage(s3_settings)
    assert isinstance(storage, S3Storage)
    storage.ensure_bucket()
    return storage


@pytest.fixture
def s3_client(s3_settings: Settings) -> Any:
    """A plain boto3 client to inspect the bucket behind the backend's back."""
    return boto3.client(
        "s3",
        endpoint_url=s3_settings.s3_endpoint_url,
        region_name=s3_settings.s3_region,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
