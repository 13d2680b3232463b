"""OpenAI's Batch API: a batch is one bulk job per line of an uploaded JSONL file, moved
on by whichever replica answers the client polling it (batch_store.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from worker.gateway.errors import APIError
from worker.gateway.files import Stored
from worker.gateway.protocol import Endpoint
from worker.gateway.state import Keyed, gateway, owned

router = APIRouter()

WINDOW = "24h"  # the one completion window OpenAI offers; Settings.batch_window_s is its length
MAX_METADATA = 16  # OpenAI's metadata: at most 16 pairs, keys of 64 and values of 512 characters


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=MAX_METADATA)


def _endpoint(value: str) -> Endpoint:
    try:
        return Endpoint(value)
    except ValueError:
        raise APIError(400, f"endpoint: must be one of {[e.value for e in Endpoint]}, got "
                            f"{value!r}", param="endpoint") from None


def _check(body: BatchCreate) -> Endpoint:
    if body.completion_window != WINDOW:
        raise APIError(400, f"completion_window: only {WINDOW!r} is supported, got "
                            f"{body.completion_window!r}", param="completion_window")
    for name, value in (body.metadata or {}).items():
        if len(name) > 64 or len(value) > 512:
            raise APIError(400, "metadata: keys of at most 64 and values of at most 512 "
                                f"characters ({name[:64]!r})", param="metadata")
    return _endpoint(body.endpoint)


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, request: Request, key: Keyed,
                       store: Stored) -> dict[str, Any]:
    endpoint = _check(body)
    window_s = gateway(request).settings.batch_window_s
    return await owned("file", body.input_file_id, store.create_batch, key.id,
                       body.input_file_id, endpoint, body.completion_window, body.metadata,
                       window_s)


@router.get("/v1/batches")
async def list_batches(key: Keyed, store: Stored,
                       limit: int = Query(20, ge=1, le=100),
                       after: str | None = None) -> dict[str, Any]:
    return await owned("batch", after or "", store.list_batches, key.id, limit, after)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, key: Keyed,
                         store: Stored) -> dict[str, Any]:
    return await owned("batch", batch_id, store.get_batch, key.id, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, key: Keyed,
                       store: Stored) -> dict[str, Any]:
    return await owned("batch", batch_id, store.cancel_batch, key.id, batch_id)
