"""The local-disk backend: signed upload tokens, streamed receipt, multipart, deletion."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.errors import StorageError
from core.storage import get_storage
from core.storage.base import CompletedPart, InvalidObjectKey, UploadPlan, UploadRejected
from core.storage.local import LocalStorage, ReceivedUpload
from tests.core.conftest import FakeClock, MiB, chunks_of, storage_settings, token_of

KEY = "acct_1/mdl_1/model.gguf"


def receive(
    storage: LocalStorage, url: str | None, data: bytes, content_length: int | None = None
) -> ReceivedUpload:
    return asyncio.run(storage.receive_upload(token_of(url), chunks_of(data), content_length))


def rejection(storage: LocalStorage, url: str | None, data: bytes, **kw: int | None) -> str:
    with pytest.raises(UploadRejected) as info:
        receive(storage, url, data, **kw)
    return info.value.code


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def upload_parts(
    storage: LocalStorage, plan: UploadPlan, data: bytes, skip: tuple[int, ...] = ()
) -> list[CompletedPart]:
    assert plan.part_size is not None
    done = []
    for part in plan.parts:
        if part.part_number not in skip:
            start = (part.part_number - 1) * plan.part_size
            got = receive(storage, part.url, data[start : start + plan.part_size])
            done.append(CompletedPart(part.part_number, f'"{got.etag}"'))
    return done


def flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


def test_receive_upload_exact_bytes_stored(local_storage: LocalStorage) -> None:
    data = os.urandom(300_000)
    plan = local_storage.plan_upload(KEY, len(data))
    assert plan.method == "put" and plan.url is not None
    assert plan.url.startswith("http://testserver/v1/uploads/")
    got = receive(local_storage, plan.url, data, content_length=len(data))
    assert got == ReceivedUpload(etag=hashlib.md5(data).hexdigest(), size=len(data))
    local_storage.complete_upload(KEY, len(data), plan, None)
    with local_storage.open_read(KEY) as stream:
        assert stream.read() == data
    path = local_storage.root / KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert files_under(local_storage.root) == [KEY]


def test_verify_token_returns_grant(local_storage: LocalStorage, clock: FakeClock) -> None:
    plan = local_storage.plan_upload(KEY, 42)
    grant = local_storage.verify_token(token_of(plan.url))
    assert (grant.key, grant.size, grant.part_number, grant.upload_id) == (KEY, 42, 0, "")
    assert grant.expires_at == int(clock.now) + 3600


@pytest.mark.parametrize("where", ["payload", "signature"])
def test_receive_upload_tampered_token_rejected(local_storage: LocalStorage, where: str) -> None:
    token = token_of(local_storage.plan_upload(KEY, 3).url)
    payload, signature = token.split(".")
    if where == "payload":
        token = f"{flip(payload, 5)}.{signature}"
    else:
        token = f"{payload}.{flip(signature, len(signature) - 1)}"
    code = rejection(local_storage, f"http://testserver/v1/uploads/{token}", b"abc")
    assert code == "UPLOAD_TOKEN_INVALID"
    assert local_storage.size_of(KEY) is None


def test_verify_token_other_secret_rejected(local_storage: LocalStorage, tmp_path: Path) -> None:
    other = LocalStorage(tmp_path, storage_settings(tmp_path, secret_key="another-secret-key-0123"))
    token = token_of(other.plan_upload(KEY, 3).url)
    with pytest.raises(UploadRejected) as info:
        local_storage.verify_token(token)
    assert info.value.code == "UPLOAD_TOKEN_INVALID"


def test_receive_upload_expired_token_rejected(tmp_path: Path, clock: FakeClock) -> None:
    settings = storage_settings(tmp_path, upload_url_expiry_s=1)
    storage = LocalStorage(tmp_path / "objects", settings, now=clock)
    plan = storage.plan_upload(KEY, 3)
    clock.advance(0.5)
    storage.verify_token(token_of(plan.url))  # still valid
    clock.advance(1)
    assert rejection(storage, plan.url, b"abc") == "UPLOAD_URL_EXPIRED"


def test_receive_upload_too_many_bytes_rejected_early(local_storage: LocalStorage) -> None:
    plan = local_storage.plan_upload(KEY, 100_000)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:  # only an early abort ends this stream
            sent += 1
            yield b"x" * 10_000

    with pytest.raises(UploadRejected) as info:
        asyncio.run(local_storage.receive_upload(token_of(plan.url), endless(), None))
    assert info.value.code == "UPLOAD_TOO_LARGE"
    assert sent == 11
    assert files_under(local_storage.root) == []


def test_receive_upload_fewer_bytes_rejected(local_storage: LocalStorage) -> None:
    plan = local_storage.plan_upload(KEY, 100)
    assert rejection(local_storage, plan.url, b"x" * 99) == "UPLOAD_SIZE_MISMATCH"
    assert files_under(local_storage.root) == []


def test_receive_upload_wrong_content_length_rejected(local_storage: LocalStorage) -> None:
    plan = local_storage.plan_upload(KEY, 100)
    code = rejection(local_storage, plan.url, b"x" * 100, content_length=101)
    assert code == "UPLOAD_SIZE_MISMATCH"


def test_complete_upload_before_put_rejected_missing(local_storage: LocalStorage) -> None:
    plan = local_storage.plan_upload(KEY, 100)
    with pytest.raises(UploadRejected) as info:
        local_storage.complete_upload(KEY, 100, plan, None)
    assert info.value.code == "UPLOAD_MISSING"


def test_upload_multipart_three_parts_then_read_back(local_storage: LocalStorage) -> None:
    data = os.urandom(11 * MiB)
    plan = local_storage.plan_upload(KEY, len(data))
    assert plan.method == "multipart" and [p.part_number for p in plan.parts] == [1, 2, 3]
    sizes = [local_storage.verify_token(token_of(p.url)).size for p in plan.parts]
    assert sizes == [5 * MiB, 5 * MiB, 1 * MiB]
    parts = upload_parts(local_storage, plan, data)
    local_storage.complete_upload(KEY, len(data), plan, parts)
    with local_storage.open_read(KEY) as stream:
        assert hashlib.sha256(stream.read()).digest() == hashlib.sha256(data).digest()
    assert files_under(local_storage.root) == [KEY]  # parts and metadata are gone
    # Idempotent: a retry (with a plan rebuilt without URLs) succeeds and changes nothing.
    rebuilt = UploadPlan("multipart", plan.expires_at, upload_id=plan.upload_id, part_size=5 * MiB)
    local_storage.complete_upload(KEY, len(data), rebuilt, None)
    assert local_storage.size_of(KEY) == len(data)


def test_receive_upload_part_wrong_size_rejected(local_storage: LocalStorage) -> None:
    plan = local_storage.plan_upload(KEY, 6 * MiB)
    assert rejection(local_storage, plan.parts[0].url, b"x" * (5 * MiB - 1)) == (
        "UPLOAD_SIZE_MISMATCH"
    )


def test_complete_multipart_missing_part_rejected_and_aborted(local_storage: LocalStorage) -> None:
    data = os.urandom(11 * MiB)
    plan = local_storage.plan_upload(KEY, len(data))
    parts = upload_parts(local_storage, plan, data, skip=(2,))
    with pytest.raises(UploadRejected) as info:
        local_storage.complete_upload(KEY, len(data), plan, parts)
    assert info.value.code == "UPLOAD_PARTS_MISMATCH"
    assert files_under(local_storage.root) == []
    # The aborted upload's remaining URLs no longer accept bytes.
    assert rejection(local_storage, plan.parts[1].url, data[5 * MiB : 10 * MiB]) == (
        "UPLOAD_MISSING"
    )


def test_complete_multipart_wrong_etag_rejected(local_storage: LocalStorage) -> None:
    data = os.urandom(6 * MiB)
    plan = local_storage.plan_upload(KEY, len(data))
    parts = upload_parts(local_storage, plan, data)
    forged = [parts[0], CompletedPart(2, "0" * 32)]
    with pytest.raises(UploadRejected) as info:
        local_storage.complete_upload(KEY, len(data), plan, forged)
    assert info.value.code == "UPLOAD_ETAG_MISMATCH"
    assert files_under(local_storage.root) == []


def test_complete_multipart_nothing_uploaded_keeps_upload_open(
    local_storage: LocalStorage,
) -> None:
    data = os.urandom(6 * MiB)
    plan = local_storage.plan_upload(KEY, len(data))
    with pytest.raises(UploadRejected) as info:
        local_storage.complete_upload(KEY, len(data), plan, None)
    assert info.value.code == "UPLOAD_MISSING"
    upload_parts(local_storage, plan, data)
    local_storage.complete_upload(KEY, len(data), plan, None)
    assert local_storage.size_of(KEY) == len(data)


def test_delete_prefix_removes_files_dirs_and_uploads(local_storage: LocalStorage) -> None:
    for name in ("a.bin", "sub/b.bin", "c.bin"):
        receive(local_storage, local_storage.plan_upload(f"acct_1/mdl_1/{name}", 3).url, b"abc")
    receive(local_storage, local_storage.plan_upload("acct_1/mdl_10/a.bin", 3).url, b"abc")
    local_storage.plan_upload("acct_1/mdl_1/big.bin", 6 * MiB)  # a pending multipart upload
    assert local_storage.delete_prefix("acct_1/mdl_1/") == 3
    assert files_under(local_storage.root) == ["acct_1/mdl_10/a.bin"]
    assert not (local_storage.root / "acct_1" / "mdl_1").exists()


@pytest.mark.parametrize(
    "key", ["acct/../../etc/passwd", "/etc/passwd", "acct\\f", "acct/f\x00", "a//b", ".multipart/x"]
)
def test_plan_upload_unsafe_key_rejected(local_storage: LocalStorage, key: str) -> None:
    with pytest.raises(InvalidObjectKey):
        local_storage.plan_upload(key, 10)


def test_open_read_symlink_escape_rejected(local_storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    local_storage.root.mkdir(parents=True)
    (local_storage.root / "acct").symlink_to(outside)
    with pytest.raises(InvalidObjectKey):
        local_storage.open_read("acct/secret")


def test_ping_root_not_a_directory_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    storage = LocalStorage(tmp_path / "file" / "objects", storage_settings(tmp_path))
    with pytest.raises(StorageError):
        storage.ping()


def test_get_storage_file_url_returns_cached_local_storage(tmp_path: Path) -> None:
    settings = storage_settings(tmp_path, storage_url=(tmp_path / "objs").as_uri())
    storage = get_storage(settings)
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path / "objs"
    assert get_storage(settings) is storage
    storage.ping()
    assert (tmp_path / "objs").is_dir()


def test_put_file_stores_once_and_never_replaces(
    local_storage: LocalStorage, tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"converted weights")
    second.write_bytes(b"other bytes")
    assert local_storage.put_file("acct/mdl/converted/abc", first) is True
    assert local_storage.put_file("acct/mdl/converted/abc", second) is False  # write-once
    with local_storage.open_read("acct/mdl/converted/abc") as f:
        assert f.read() == b"converted weights"
    assert not [p for p in files_under(local_storage.root) if ".upload-" in p]  # no debris
    with pytest.raises(InvalidObjectKey):
        local_storage.put_file("acct/../escape", first)
