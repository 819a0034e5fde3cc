"""S3-compatible object storage (AWS S3, MinIO, R2, moto_server) through boto3."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import StorageError
from core.settings import Settings
from core.storage.base import (
    CompletedPart,
    PartUrl,
    StoredPart,
    UploadPlan,
    UploadRejected,
    check_key,
    check_parts,
    part_sizes,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

_DELETE_BATCH = 1000  # the most keys one DeleteObjects call accepts
_READ_BUFFER = 1024 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _storage_errors(action: str) -> Iterator[None]:
    """Turn transport failures and unexpected refusals into `StorageError` (503)."""
    try:
        yield
    except ClientError as exc:
        code = _error_code(exc)
        raise StorageError(
            f"object storage refused to {action} ({code})", details={"storage_code": code}
        ) from exc
    except BotoCoreError as exc:
        raise StorageError(f"object storage is unreachable; could not {action}") from exc


class _S3Reader(io.RawIOBase):
    """A raw stream over a `get_object` body; buffered by `open_read`."""

    def __init__(self, body: StreamingBody) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        with _storage_errors("read the object"):
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def _make_client(settings: Settings, endpoint: str | None, max_attempts: int) -> S3Client:
    client: S3Client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=settings.s3_region,
        config=Config(
            signature_version="s3v4",
            # Path style works on every S3 clone and with bucket names holding dots.
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )
    return client


class S3Storage:
    """Objects at `s3://<bucket>/<prefix>/<key>`, uploaded by clients through presigned URLs."""

    def __init__(
        self,
        settings: Settings,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.bucket = bucket
        self._prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._settings = settings
        self._client = client or _make_client(settings, settings.s3_endpoint_url, max_attempts)
        # Upload URLs may need another host than the one workers use (compose, k8s): sign
        # them against the public endpoint. Presigning is local, no request is made.
        public = settings.s3_public_endpoint_url
        self._signer = _make_client(settings, public, max_attempts) if public else self._client

    def _key(self, key: str) -> str:
        return self._prefix + check_key(key)

    def ensure_bucket(self) -> None:
        """Create the bucket if missing; for tests and the embedded stack, never implicit."""
        with _storage_errors("create the bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _error_code(exc) not in _NOT_FOUND | {"NoSuchBucket"}:
                    raise
            if self._settings.s3_region == "us-east-1":
                self._client.create_bucket(Bucket=self.bucket)
            else:
                self._client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": self._settings.s3_region},  # type: ignore[typeddict-item]
                )

    # -- planning ------------------------------------------------------------------------

    def plan_upload(self, key: str, size: int) -> UploadPlan:
        full = self._key(key)
        expiry = self._settings.upload_url_expiry_s
        expires_at = datetime.now(UTC) + timedelta(seconds=expiry)
        if size < self._settings.multipart_threshold_bytes:
            # ContentLength becomes a signed header: real S3 refuses any other body size.
            params = {"Bucket": self.bucket, "Key": full, "ContentLength": size}
            url = self._signer.generate_presigned_url("put_object", Params=params, ExpiresIn=expiry)
            return UploadPlan(method="put", expires_at=expires_at, url=url)
        part_size = self._settings.multipart_part_size
        sizes = part_sizes(size, part_size)
        with _storage_errors("start a multipart upload"):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full)[
                "UploadId"
            ]
        parts = [
            PartUrl(n, self._presign_part(full, upload_id, n, length, expiry))
            for n, length in enumerate(sizes, start=1)
        ]
        return UploadPlan(
            method="multipart",
            expires_at=expires_at,
            upload_id=upload_id,
            part_size=part_size,
            parts=parts,
        )

    def _presign_part(self, full: str, upload_id: str, number: int, length: int, exp: int) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": full,
            "UploadId": upload_id,
            "PartNumber": number,
            "ContentLength": length,
        }
        return self._signer.generate_presigned_url("upload_part", Params=params, ExpiresIn=exp)

    # -- completion ----------------------------------------------------------------------

    def complete_upload(
        self, key: str, size: int, plan: UploadPlan, parts: list[CompletedPart] | None
    ) -> None:
        full = self._key(key)
        with _storage_errors("complete the upload"):
            if plan.method == "multipart":
                self._complete_multipart(full, size, plan, parts)
            else:
                self._check_object(full, size)

    def _check_object(self, full: str, size: int) -> None:
        actual = self._head_size(full)
        if actual is None:
            raise UploadRejected("UPLOAD_MISSING", "no object found; upload it first")
        if actual != size:
            self._client.delete_object(Bucket=self.bucket, Key=full)
            raise UploadRejected(
                "UPLOAD_SIZE_MISMATCH", f"object is {actual} bytes; {size} were declared"
            )

    def _complete_multipart(
        self, full: str, size: int, plan: UploadPlan, parts: list[CompletedPart] | None
    ) -> None:
        if not plan.upload_id or not plan.part_size:
            raise ValueError("a multipart plan needs its upload_id and part_size")
        stored = self._list_parts(full, plan.upload_id)
        if stored is None:  # completed already (idempotent retry), or aborted
            if self._head_size(full) == size:
                return
            raise UploadRejected("UPLOAD_MISSING", "no multipart upload found; upload it first")
        if not stored:
            raise UploadRejected("UPLOAD_MISSING", "no part uploaded yet")
        try:
            check_parts(stored, size, plan.part_size, parts)
        except UploadRejected:
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=plan.upload_id
            )
            raise
        try:
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=plan.upload_id,
                # The server's own ETags: the client's were only compared, never trusted.
                MultipartUpload={
                    "Parts": [{"PartNumber": p.part_number, "ETag": p.etag} for p in stored]
                },
            )
        except ClientError as exc:
            if _error_code(exc) != "NoSuchUpload":
                raise
        # Covers a concurrent completion too: what counts is the object now in place.
        self._check_object(full, size)

    def _list_parts(self, full: str, upload_id: str) -> list[StoredPart] | None:
        """Every part S3 holds for the upload, in order; None when the upload is gone."""
        stored: list[StoredPart] = []
        pages = self._client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=full, UploadId=upload_id
        )
        try:
            for page in pages:
                stored.extend(
                    StoredPart(p["PartNumber"], p["Size"], p["ETag"]) for p in page.get("Parts", [])
                )
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchUpload", "404"}:
                return None
            raise
        return sorted(stored, key=lambda p: p.part_number)

    def _head_size(self, full: str) -> int | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise

    # -- reading and deleting ------------------------------------------------------------

    def size_of(self, key: str) -> int | None:
        full = self._key(key)
        with _storage_errors("read the object size"):
            return self._head_size(full)

    def open_read(self, key: str) -> BinaryIO:
        full = self._key(key)
        with _storage_errors("open the object"):
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            except ClientError as exc:
                if _error_code(exc) in _NOT_FOUND:
                    raise FileNotFoundError(key) from exc
                raise
        return io.BufferedReader(_S3Reader(body), buffer_size=_READ_BUFFER)

    def put_file(self, key: str, source: Path) -> bool:
        full = self._key(key)
        with _storage_errors("store a file"):
            if self._head_size(full) is not None:
                return False
            try:
                with open(source, "rb") as body:
                    # Conditional write: a concurrent writer of the same key loses, not wins.
                    self._client.put_object(
                        Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*"
                    )
            except ClientError as exc:
                if _error_code(exc) not in {"PreconditionFailed", "412"}:
                    raise
                return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        full = self._prefix + check_key(prefix, is_prefix=True)
        with _storage_errors("delete objects"):
            deleted = 0
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": _DELETE_BATCH}
            )
            for page in pages:
                keys = [obj["Key"] for obj in page.get("Contents", [])]
                if keys:
                    self._delete_batch(keys)
                    deleted += len(keys)
            self._abort_uploads(full)
        return deleted

    def _delete_batch(self, keys: list[str]) -> None:
        reply = self._client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
        )
        if reply.get("Errors"):
            first: Any = reply["Errors"][0]
            raise StorageError(
                f"object storage kept {len(reply['Errors'])} objects: {first.get('Code')}"
            )

    def _abort_uploads(self, full_prefix: str) -> None:
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=full_prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )

    def ping(self) -> None:
        with _storage_errors("reach the bucket"):
            self._client.head_bucket(Bucket=self.bucket)
