"""The S3 backend against a real S3 endpoint over HTTP (moto_server)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from core.errors import StorageError
from core.storage import get_storage
from core.storage.base import CompletedPart, InvalidObjectKey, UploadPlan, UploadRejected
from core.storage.s3 import S3Storage
from tests.core.conftest import MiB, storage_settings
from tests.utils.services import free_port

KEY = "acct_1/mdl_1/model.gguf"


def put(url: str | None, data: bytes) -> httpx.Response:
    assert url is not None
    response = httpx.put(url, content=data, timeout=30)
    response.raise_for_status()
    return response


def upload_parts(plan: UploadPlan, data: bytes, skip: tuple[int, ...] = ()) -> list[CompletedPart]:
    assert plan.part_size is not None
    done = []
    for part in plan.parts:
        if part.part_number in skip:
            continue
        start = (part.part_number - 1) * plan.part_size
        response = put(part.url, data[start : start + plan.part_size])
        done.append(CompletedPart(part.part_number, response.headers["ETag"]))
    return done


def pending_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def sha256_of_stream(storage: S3Storage, key: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(key) as stream:
        while block := stream.read(1024 * 1024):
            assert len(block) <= 1024 * 1024
            digest.update(block)
    return digest.hexdigest()


def test_upload_single_put_then_read_back(s3_storage: S3Storage) -> None:
    data = os.urandom(1000)
    plan = s3_storage.plan_upload(KEY, len(data))
    assert plan.method == "put"
    put(plan.url, data)
    s3_storage.complete_upload(KEY, len(data), plan, None)
    assert s3_storage.size_of(KEY) == len(data)
    with s3_storage.open_read(KEY) as stream:
        assert stream.read(10) == data[:10]
        assert stream.read() == data[10:]


def test_plan_upload_single_put_signs_content_length(s3_storage: S3Storage) -> None:
    plan = s3_storage.plan_upload(KEY, 1234)
    query = parse_qs(urlsplit(plan.url or "").query)
    assert "content-length" in query["X-Amz-SignedHeaders"][0].split(";")
    assert query["X-Amz-Expires"] == ["3600"]


def test_upload_multipart_three_parts_then_read_back(s3_storage: S3Storage, s3_client: Any) -> None:
    data = os.urandom(11 * MiB)
    plan = s3_storage.plan_upload(KEY, len(data))
    assert plan.method == "multipart" and plan.part_size == 5 * MiB
    assert [p.part_number for p in plan.parts] == [1, 2, 3]
    parts = upload_parts(plan, data)
    s3_storage.complete_upload(KEY, len(data), plan, parts)
    assert s3_storage.size_of(KEY) == len(data)
    assert sha256_of_stream(s3_storage, KEY) == hashlib.sha256(data).hexdigest()
    assert pending_uploads(s3_client, s3_storage.bucket) == []


def test_complete_multipart_twice_is_idempotent(s3_storage: S3Storage) -> None:
    data = os.urandom(6 * MiB)
    plan = s3_storage.plan_upload(KEY, len(data))
    parts = upload_parts(plan, data)
    s3_storage.complete_upload(KEY, len(data), plan, parts)
    # A plan rebuilt from the database carries no URLs; the count comes from the size.
    rebuilt = UploadPlan("multipart", plan.expires_at, upload_id=plan.upload_id, part_size=5 * MiB)
    s3_storage.complete_upload(KEY, len(data), rebuilt, None)
    assert s3_storage.size_of(KEY) == len(data)


def test_complete_upload_before_put_rejected_missing(s3_storage: S3Storage) -> None:
    plan = s3_storage.plan_upload(KEY, 100)
    with pytest.raises(UploadRejected) as info:
        s3_storage.complete_upload(KEY, 100, plan, None)
    assert info.value.code == "UPLOAD_MISSING"


def test_complete_upload_oversized_put_rejected_and_deleted(s3_storage: S3Storage) -> None:
    plan = s3_storage.plan_upload(KEY, 100)
    put(plan.url, b"x" * 150)  # moto does not enforce the signed Content-Length; S3 would
    with pytest.raises(UploadRejected) as info:
        s3_storage.complete_upload(KEY, 100, plan, None)
    assert info.value.code == "UPLOAD_SIZE_MISMATCH"
    assert s3_storage.size_of(KEY) is None


def test_complete_multipart_missing_part_rejected_and_aborted(
    s3_storage: S3Storage, s3_client: Any
) -> None:
    data = os.urandom(11 * MiB)
    plan = s3_storage.plan_upload(KEY, len(data))
    parts = upload_parts(plan, data, skip=(2,))
    with pytest.raises(UploadRejected) as info:
        s3_storage.complete_upload(KEY, len(data), plan, parts)
    assert info.value.code == "UPLOAD_PARTS_MISMATCH"
    assert pending_uploads(s3_client, s3_storage.bucket) == []
    assert s3_storage.size_of(KEY) is None


def test_complete_multipart_wrong_part_size_rejected_and_aborted(
    s3_storage: S3Storage, s3_client: Any
) -> None:
    data = os.urandom(6 * MiB)
    plan = s3_storage.plan_upload(KEY, len(data))
    # Same total, but part 1 one byte short: only the per-part check can catch it.
    put(plan.parts[0].url, data[: 5 * MiB - 1])
    put(plan.parts[1].url, data[5 * MiB - 1 :])
    with pytest.raises(UploadRejected) as info:
        s3_storage.complete_upload(KEY, len(data), plan, None)
    assert info.value.code == "UPLOAD_PART_SIZE_MISMATCH"
    assert pending_uploads(s3_client, s3_storage.bucket) == []


def test_complete_multipart_wrong_etag_rejected(s3_storage: S3Storage) -> None:
    data = os.urandom(6 * MiB)
    plan = s3_storage.plan_upload(KEY, len(data))
    parts = upload_parts(plan, data)
    forged = [CompletedPart(parts[0].part_number, '"' + "0" * 32 + '"'), parts[1]]
    with pytest.raises(UploadRejected) as info:
        s3_storage.complete_upload(KEY, len(data), plan, forged)
    assert info.value.code == "UPLOAD_ETAG_MISMATCH"


def test_complete_multipart_nothing_uploaded_keeps_upload_open(
    s3_storage: S3Storage, s3_client: Any
) -> None:
    plan = s3_storage.plan_upload(KEY, 6 * MiB)
    with pytest.raises(UploadRejected) as info:
        s3_storage.complete_upload(KEY, 6 * MiB, plan, None)
    assert info.value.code == "UPLOAD_MISSING"
    assert len(pending_uploads(s3_client, s3_storage.bucket)) == 1


def test_plan_upload_too_many_parts_raises(s3_storage: S3Storage) -> None:
    with pytest.raises(ValueError, match="limit"):
        s3_storage.plan_upload(KEY, 10_001 * 5 * MiB)


def test_delete_prefix_removes_objects_and_pending_uploads(
    s3_storage: S3Storage, s3_client: Any
) -> None:
    for name in ("a.bin", "b.bin", "sub/c.bin", "d.bin"):
        plan = s3_storage.plan_upload(f"acct_1/mdl_1/{name}", 3)
        put(plan.url, b"abc")
    kept = s3_storage.plan_upload("acct_1/mdl_2/a.bin", 3)
    put(kept.url, b"abc")
    s3_storage.plan_upload("acct_1/mdl_1/big.bin", 6 * MiB)  # a pending multipart upload
    assert s3_storage.delete_prefix("acct_1/mdl_1/") == 4
    assert s3_storage.size_of("acct_1/mdl_1/a.bin") is None
    assert s3_storage.size_of("acct_1/mdl_2/a.bin") == 3
    assert pending_uploads(s3_client, s3_storage.bucket) == []


def test_object_keys_live_under_url_prefix(s3_storage: S3Storage, s3_client: Any) -> None:
    plan = s3_storage.plan_upload(KEY, 3)
    put(plan.url, b"abc")
    listed = s3_client.list_objects_v2(Bucket=s3_storage.bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"models/{KEY}"]


@pytest.mark.parametrize(
    "key", ["acct/../etc/passwd", "/abs/key", "acct\\mdl\\f", "acct/mdl/f\x00", "", "a//b", "./a"]
)
def test_plan_upload_unsafe_key_rejected(s3_storage: S3Storage, key: str) -> None:
    with pytest.raises(InvalidObjectKey):
        s3_storage.plan_upload(key, 10)


def test_open_read_missing_object_raises_file_not_found(s3_storage: S3Storage) -> None:
    with pytest.raises(FileNotFoundError):
        s3_storage.open_read(KEY)


def test_ping_missing_bucket_raises_storage_error(s3_settings: Any, tmp_path: Path) -> None:
    storage = get_storage(s3_settings)  # ensure_bucket never called
    with pytest.raises(StorageError):
        storage.ping()


def test_ping_unreachable_endpoint_raises_storage_error(tmp_path: Path) -> None:
    settings = storage_settings(
        tmp_path,
        storage_url="s3://bucket/models",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
    )
    storage = S3Storage(settings, "bucket", "models", max_attempts=1)
    with pytest.raises(StorageError) as info:
        storage.ping()
    assert info.value.code == "SERVICE_UNAVAILABLE"
    with pytest.raises(StorageError):
        storage.size_of(KEY)


def test_plan_upload_signs_for_public_endpoint_when_set(s3_settings: Any) -> None:
    public = s3_settings.model_copy(update={"s3_public_endpoint_url": "https://files.example.test"})
    storage = get_storage(public)
    assert isinstance(storage, S3Storage)
    storage.ensure_bucket()  # still talks to the internal endpoint
    small = storage.plan_upload(KEY, 10)
    assert (small.url or "").startswith("https://files.example.test/")
    assert storage.size_of(KEY) is None  # reads go to the internal endpoint


def test_put_file_stores_once_and_never_replaces(s3_storage: S3Storage, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"converted weights")
    second.write_bytes(b"other bytes")
    assert s3_storage.put_file("acct/mdl/converted/abc", first) is True
    assert s3_storage.put_file("acct/mdl/converted/abc", second) is False  # write-once
    with s3_storage.open_read("acct/mdl/converted/abc") as f:
        assert f.read() == b"converted weights"
    assert s3_storage.delete_prefix("acct/mdl/") == 1  # deleting the model removes it too
