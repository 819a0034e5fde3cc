"""Local-disk object storage: the embedded default, with signed upload URLs served by the API."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from core.errors import StorageError
from core.settings import Settings
from core.storage.base import (
    CompletedPart,
    InvalidObjectKey,
    PartUrl,
    StoredPart,
    UploadPlan,
    UploadRejected,
    check_key,
    check_parts,
    part_sizes,
)
from core.storage.disk import (
    finish,
    fsync_dir,
    make_dirs,
    remove_tree,
    stream_into,
    write_private,
)
from core.storage.signing import UploadGrant, UploadTokenSigner

MULTIPART_DIR = ".multipart"
_TMP_PREFIX = ".upload-"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_COPY_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedUpload:
    """The bytes `receive_upload` stored; `etag` is the MD5 hex digest, as S3 reports it."""

    etag: str
    size: int


def _missing(what: str = "upload") -> UploadRejected:
    return UploadRejected("UPLOAD_MISSING", f"no {what} found; upload it first")


class LocalStorage:
    """Objects at `<root>/<key>`; uploads arrive through `PUT {public_base_url}/v1/uploads/…`."""

    def __init__(
        self, root: Path, settings: Settings, *, now: Callable[[], float] = time.time
    ) -> None:
        self.root = root
        self._settings = settings
        self._now = now
        self._signer = UploadTokenSigner(settings.secret_key.get_secret_value(), now=now)

    # -- paths ---------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == MULTIPART_DIR:
            raise InvalidObjectKey(f"object key {key!r} is reserved")
        path = self.root.joinpath(*key.split("/"))
        # A symlinked directory inside the root must not lead writes outside it.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise InvalidObjectKey(f"object key {key!r} escapes the storage root")
        return path

    def _upload_dir(self, upload_id: str | None) -> Path:
        if upload_id is None or not _UPLOAD_ID.fullmatch(upload_id):
            raise _missing("multipart upload")
        return self.root / MULTIPART_DIR / upload_id

    @staticmethod
    def _meta(upload_dir: Path) -> dict[str, Any] | None:
        try:
            meta: dict[str, Any] = json.loads((upload_dir / "meta.json").read_text())
        except FileNotFoundError:
            return None
        return meta

    # -- planning ------------------------------------------------------------------------

    def plan_upload(self, key: str, size: int) -> UploadPlan:
        self._path(key)
        expires = int(self._now()) + self._settings.upload_url_expiry_s
        expires_at = datetime.fromtimestamp(expires, tz=UTC)
        if size < self._settings.multipart_threshold_bytes:
            url = self._url(UploadGrant(key, size, 0, "", expires))
            return UploadPlan(method="put", expires_at=expires_at, url=url)
        part_size = self._settings.multipart_part_size
        sizes = part_sizes(size, part_size)
        upload_id = secrets.token_hex(16)
        upload_dir = self._upload_dir(upload_id)
        make_dirs(upload_dir)
        meta = {"key": key, "size": size, "part_size": part_size}
        write_private(upload_dir / "meta.json", json.dumps(meta))
        parts = [
            PartUrl(n, self._url(UploadGrant(key, s, n, upload_id, expires)))
            for n, s in enumerate(sizes, start=1)
        ]
        return UploadPlan(
            method="multipart",
            expires_at=expires_at,
            upload_id=upload_id,
            part_size=part_size,
            parts=parts,
        )

    def _url(self, grant: UploadGrant) -> str:
        base = self._settings.public_base_url.rstrip("/")
        return f"{base}/v1/uploads/{self._signer.sign(grant)}"

    def verify_token(self, token: str) -> UploadGrant:
        """The grant of a genuine, unexpired upload token; `UploadRejected` otherwise."""
        return self._signer.verify(token)

    # -- receiving (called by the API's upload route) ------------------------------------

    async def receive_upload(
        self, token: str, chunks: AsyncIterator[bytes], content_length: int | None
    ) -> ReceivedUpload:
        """Store one PUT body: exactly the granted size, written aside then renamed in."""
        grant = self.verify_token(token)
        if content_length is not None and content_length != grant.size:
            raise UploadRejected(
                "UPLOAD_SIZE_MISMATCH",
                f"Content-Length is {content_length}; this URL accepts exactly {grant.size} bytes",
            )
        target = self._receive_target(grant)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX)
        except FileNotFoundError as exc:  # the multipart upload was aborted meanwhile
            raise _missing("multipart upload") from exc
        except OSError as exc:
            raise StorageError("local object storage could not store the upload") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                etag = await stream_into(out, chunks, grant.size)
            if grant.part_number == 0:
                # Objects are write-once: a signed URL replayed after the upload (after
                # validation, say) must not swap the bytes of a model. link() fails if the
                # object exists, atomically.
                os.link(tmp, target)
            else:
                os.replace(tmp, target)  # a part may be retried until the upload completes
            fsync_dir(target.parent)
        except FileExistsError as exc:
            raise UploadRejected(
                "UPLOAD_URL_USED", "this file was already uploaded; objects cannot be replaced"
            ) from exc
        except FileNotFoundError as exc:  # aborted or deleted while the bytes arrived
            raise _missing("upload in progress") from exc
        except OSError as exc:
            raise StorageError("local object storage could not store the upload") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return ReceivedUpload(etag=etag, size=grant.size)

    def _receive_target(self, grant: UploadGrant) -> Path:
        if grant.part_number == 0:
            target = self._path(grant.key)
            make_dirs(target.parent)
            return target
        upload_dir = self._upload_dir(grant.upload_id)
        if not upload_dir.is_dir():
            raise _missing("multipart upload")
        return upload_dir / str(grant.part_number)

    # -- completion ----------------------------------------------------------------------

    def complete_upload(
        self, key: str, size: int, plan: UploadPlan, parts: list[CompletedPart] | None
    ) -> None:
        if plan.method == "multipart":
            self._complete_multipart(key, size, plan.upload_id, parts)
            return
        actual = self.size_of(key)
        if actual is None:
            raise _missing()
        if actual != size:
            self._path(key).unlink(missing_ok=True)
            raise UploadRejected(
                "UPLOAD_SIZE_MISMATCH", f"object is {actual} bytes; {size} were declared"
            )

    def _complete_multipart(
        self, key: str, size: int, upload_id: str | None, parts: list[CompletedPart] | None
    ) -> None:
        target = self._path(key)
        upload_dir = self._upload_dir(upload_id)
        meta = self._meta(upload_dir)
        if meta is None:
            # Already completed (idempotent retry) or never started / aborted.
            if self.size_of(key) == size:
                return
            raise _missing("multipart upload")
        if meta["key"] != key:
            raise _missing("multipart upload for this key")
        stored = sorted(
            (
                StoredPart(int(p.name), p.stat().st_size, "")
                for p in upload_dir.iterdir()
                if p.name.isdigit()
            ),
            key=lambda p: p.part_number,
        )
        if not stored:
            raise _missing()  # nothing uploaded yet: keep the upload open for the client
        try:
            check_parts(stored, size, int(meta["part_size"]), None)
            self._assemble(upload_dir, stored, target, size, int(meta["part_size"]), parts)
        except UploadRejected:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        shutil.rmtree(upload_dir, ignore_errors=True)

    def _assemble(
        self,
        upload_dir: Path,
        stored: list[StoredPart],
        target: Path,
        size: int,
        part_size: int,
        client: list[CompletedPart] | None,
    ) -> None:
        """Concatenate the parts into `target` atomically, checking ETags on the way."""
        make_dirs(target.parent)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX)
        tmp = Path(tmp_name)
        try:
            hashed = []
            with os.fdopen(fd, "wb") as out:
                for part in stored:
                    md5 = hashlib.md5(usedforsecurity=False)
                    with open(upload_dir / str(part.part_number), "rb") as src:
                        while block := src.read(_COPY_CHUNK):
                            md5.update(block)
                            out.write(block)
                    hashed.append(StoredPart(part.part_number, part.size, md5.hexdigest()))
                finish(out, b"")
            check_parts(hashed, size, part_size, client)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)

    # -- reading and deleting ------------------------------------------------------------

    def size_of(self, key: str) -> int | None:
        try:
            info = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def open_read(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def put_file(self, key: str, source: Path) -> bool:
        target = self._path(key)
        try:
            make_dirs(target.parent)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX)
        except OSError as exc:
            raise StorageError("local object storage could not store a file") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while block := src.read(_COPY_CHUNK):
                    out.write(block)
                finish(out, b"")
            os.link(tmp, target)  # write-once, atomically, as client uploads are
            fsync_dir(target.parent)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError("local object storage could not store a file") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def delete_prefix(self, prefix: str) -> int:
        check_key(prefix, is_prefix=True)
        head, _, tail = prefix.rpartition("/")
        base = self.root.joinpath(*head.split("/")) if head else self.root
        deleted = 0
        if base.is_dir() and base.resolve().is_relative_to(self.root.resolve()):
            for entry in list(base.iterdir()):
                if not entry.name.startswith(tail) or (
                    base == self.root and entry.name == MULTIPART_DIR
                ):
                    continue
                deleted += remove_tree(entry)
            self._prune_empty(base)
        self._abort_uploads_under(prefix)
        return deleted

    def _prune_empty(self, start: Path) -> None:
        """Remove `start` and its parents while they are empty, stopping at the root."""
        path = start
        while path != self.root and path.is_relative_to(self.root):
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent

    def _abort_uploads_under(self, prefix: str) -> None:
        uploads = self.root / MULTIPART_DIR
        if not uploads.is_dir():
            return
        for upload_dir in uploads.iterdir():
            meta = self._meta(upload_dir)
            if meta is not None and str(meta["key"]).startswith(prefix):
                shutil.rmtree(upload_dir, ignore_errors=True)

    def ping(self) -> None:
        try:
            make_dirs(self.root)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise StorageError("local object storage is not writable") from exc
