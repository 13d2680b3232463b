"""OpenAI's Files API: the JSONL files batches read, and the files they write."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import Message

from worker.gateway.batch_store import BatchStore
from worker.gateway.errors import APIError, not_found
from worker.gateway.state import Keyed, gateway, owned

router = APIRouter()

READ_CHUNK = 1 << 20
# Room for the multipart framing and the purpose field around the file itself.
MULTIPART_SLACK = 64 * 1024
MAX_LIST = 10_000  # OpenAI's largest page of files


def batch_store(request: Request) -> BatchStore:
    """A BatchStore on the gateway's client: it holds no connection of its own."""
    gw = gateway(request)
    return BatchStore(gw.client, gw.model_name)


Stored = Annotated[BatchStore, Depends(batch_store)]


def _too_large(limit: int) -> APIError:
    return APIError(413, f"file: larger than this server's limit of {limit} bytes "
                         "(PAGEDQ_MAX_FILE_BYTES)", param="file")


def _capped(request: Request, limit: int) -> Request:
    """The request, its body cut off with a 413 once it grows past what a file of
    `limit` bytes needs: a chunked upload has no length to refuse it by up front."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit + MULTIPART_SLACK:
            raise _too_large(limit)
        return message

    return Request(request.scope, receive)


async def _read(upload: UploadFile, limit: int) -> bytes:
    content = bytearray()
    while chunk := await upload.read(READ_CHUNK):
        content += chunk
        if len(content) > limit:
            raise _too_large(limit)
    return bytes(content)


@router.post("/v1/files")
async def upload_file(request: Request, key: Keyed,
                      store: Stored) -> dict[str, Any]:
    limit = gateway(request).settings.max_file_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + MULTIPART_SLACK:
        raise _too_large(limit)
    async with _capped(request, limit).form(max_files=1, max_fields=4) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise APIError(400, f"purpose: only 'batch' is supported, got {purpose!r}",
                           param="purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: a file part is required", param="file")
        content = await _read(upload, limit)
        filename = upload.filename or "upload.jsonl"
    return await run_in_threadpool(store.create_file, key.id, purpose, filename, content)


@router.get("/v1/files")
async def list_files(key: Keyed, store: Stored,
                     purpose: str | None = None,
                     limit: int = Query(MAX_LIST, ge=1, le=MAX_LIST),
                     after: str | None = None) -> dict[str, Any]:
    return await owned("file", after or "", store.list_files, key.id, purpose, limit, after)


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, key: Keyed,
                        store: Stored) -> dict[str, Any]:
    return await owned("file", file_id, store.get_file, key.id, file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, key: Keyed,
                       store: Stored) -> Response:
    content = await owned("file", file_id, store.file_content, key.id, file_id)
    return Response(content, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, key: Keyed,
                      store: Stored) -> dict[str, Any]:
    if not await run_in_threadpool(store.delete_file, key.id, file_id):
        raise not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}
