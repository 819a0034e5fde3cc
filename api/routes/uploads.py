"""Uploads to the `file` storage backend, signed by the API itself."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import StorageDep
from api.schemas import UploadReceived
from core.errors import InvalidRequest, NotImplementedByConfig, PayloadTooLarge
from core.storage.base import UploadRejected
from core.storage.local import LocalStorage

router = APIRouter(tags=["uploads"])

_TOO_LARGE = {"UPLOAD_TOO_LARGE", "UPLOAD_SIZE_MISMATCH"}
_AUTH = {"UPLOAD_TOKEN_INVALID", "UPLOAD_URL_EXPIRED", "UPLOAD_URL_USED"}


@router.put("/v1/uploads/{token}")
async def receive(
    token: str, request: Request, storage: StorageDep, response: Response
) -> UploadReceived:
    """Stream one file (or one part) to disk, enforcing the signed size."""
    if not isinstance(storage, LocalStorage):
        raise NotImplementedByConfig("uploads go straight to object storage on this server")
    length = request.headers.get("content-length")
    try:
        received = await storage.receive_upload(
            token, request.stream(), int(length) if length and length.isdigit() else None
        )
    except UploadRejected as exc:
        if exc.code in _AUTH:
            raise UploadForbidden(exc.message, details={"code": exc.code}) from exc
        if exc.code in _TOO_LARGE:
            raise PayloadTooLarge(exc.message, details={"code": exc.code}) from exc
        raise InvalidRequest(exc.message, details={"code": exc.code}) from exc
    response.headers["ETag"] = f'"{received.etag}"'
    return UploadReceived(etag=received.etag, size=received.size)


class UploadForbidden(InvalidRequest):
    code = "UPLOAD_URL_INVALID"
    status_code = 403
