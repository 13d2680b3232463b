"""`/v1/models`, `/v1/chat/completions` and `/v1/completions`: each request is one job,
stored and published as the Python client does, then followed until it ends (its text
streamed as server-sent events when asked). A client that goes away cancels its job."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool

from worker.client import BrokerUnavailable
from worker.gateway import protocol
from worker.gateway.errors import APIError, not_found
from worker.gateway.protocol import Endpoint
from worker.gateway.state import Gateway, Keyed, gateway
from worker.job_rows import JobOwner
from worker.keys import KeyInfo
from worker.models import JobStatus
from worker.records import JobRecord
from worker.schemas import InvalidJob, JobRequest
from worker.streams import StreamDelta, StreamDiverged, follow

log = logging.getLogger(__name__)
router = APIRouter()
# What OpenAI's /v1/models reports as a model's creation: here, the gateway's start.
_STARTED = int(time.time())
# Failures of the database or Redis: the gateway cannot take or follow jobs now.
UNAVAILABLE = (BrokerUnavailable, OperationalError, InterfaceError, RedisError, OSError)


def _model(gw: Gateway) -> dict[str, Any]:
    return {"id": gw.model_name, "object": "model", "created": _STARTED, "owned_by": "pagedq"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model(gateway(request))]}


# `:path`: a model named after its folder or hub id holds slashes.
@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    gw = gateway(request)
    if model_id != gw.model_name:
        raise not_found("model", model_id)
    return _model(gw)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, key: Keyed) -> Response:
    return await _complete(request, Endpoint.CHAT, key)


@router.post("/v1/completions")
async def completions(request: Request, key: Keyed) -> Response:
    return await _complete(request, Endpoint.COMPLETIONS, key)


async def _complete(request: Request, endpoint: Endpoint, key: KeyInfo) -> Response:
    gw = gateway(request)
    body = await _json_body(request)
    job = protocol.job_request(endpoint, body, model=gw.model_name)
    job_id = await _submit(gw, endpoint, job, key)
    if job.stream:
        events = _events(gw, endpoint, job, job_id, protocol.include_usage(body))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    record = await _until_finished(request, gw, job_id)
    if record.status is not JobStatus.SUCCEEDED:
        raise protocol.job_error(record)
    return JSONResponse(protocol.response_body(endpoint, record, gw.model_name))


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


async def _submit(gw: Gateway, endpoint: Endpoint, job: JobRequest, key: KeyInfo) -> str:
    limit = gw.settings.max_queued_jobs
    try:
        if limit is not None and await gw.queued_jobs() >= limit:
            raise APIError(429, f"Too many queued jobs (PAGEDQ_MAX_QUEUED_JOBS={limit}); "
                                "retry later.", code="queue_full")
        # The size caps (CPU only) here, so that a batch of submissions cannot fail
        # for one request's input.
        checked = gw.client.parse(job)
        return await gw.intake.submit(checked, JobOwner(api_key_id=key.id))
    except InvalidJob as exc:
        raise protocol.invalid_job(endpoint, str(exc)) from None
    except UNAVAILABLE as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: BaseException) -> APIError:
    log.warning("gateway: jobs unavailable: %r", exc)
    return APIError(503, "The job queue is unavailable; retry later.", code="unavailable")


async def _follow(gw: Gateway, job_id: str) -> AsyncIterator[StreamDelta | JobRecord]:
    """The job's deltas, then its finished record; a reader that stops before the end
    (a client gone, an error) cancels the job, as nobody will read its answer."""
    finished = False
    try:
        fetch = partial(run_in_threadpool, gw.client.get, job_id)
        async for item in follow(gw.streams, job_id, fetch, fresh=True):
            finished = isinstance(item, JobRecord)
            yield item
    finally:
        if not finished:
            # Shielded: this runs while the request's task is being cancelled.
            with anyio.CancelScope(shield=True):
                await _cancel(gw, job_id)


async def _cancel(gw: Gateway, job_id: str) -> None:
    try:
        await run_in_threadpool(gw.client.cancel, job_id)
    except Exception as exc:  # the job's deadline still ends it
        log.warning("gateway: could not cancel job %s: %r", job_id, exc)


async def _until_finished(request: Request, gw: Gateway, job_id: str) -> JobRecord:
    """The finished job; a client that disconnects meanwhile cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, gw, job_id))
    try:
        async with aclosing(_follow(gw, job_id)) as items:
            async for item in items:
                if isinstance(item, JobRecord):
                    return item
    except UNAVAILABLE as exc:
        raise _unavailable(exc) from None
    except KeyError:
        raise _gone(job_id) from None
    finally:
        watcher.cancel()
    raise _gone(job_id)


def _gone(job_id: str) -> APIError:
    return APIError(500, f"Job {job_id} is no longer in the database.", code="job_gone")


async def _cancel_on_disconnect(request: Request, gw: Gateway, job_id: str) -> None:
    # The body has been read: the next message is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        continue
    await _cancel(gw, job_id)


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


async def _events(gw: Gateway, endpoint: Endpoint, job: JobRequest, job_id: str,
                  with_usage: bool) -> AsyncIterator[str]:
    """Server-sent chunks: each delta as it comes, a last chunk per choice with its
    finish_reason, the usage if asked, then [DONE]; a failure is an error event.
    (Starlette cancels this generator when the client disconnects: _follow then
    cancels the job.)"""
    created, model, top = int(time.time()), gw.model_name, job.params.logprobs
    started: set[int] = set()  # choices whose first chunk (with the role) has gone
    offsets: dict[int, int] = {}  # completions' text_offset: text sent per choice
    record: JobRecord | None = None
    try:
        async with aclosing(_follow(gw, job_id)) as items:
            async for item in items:
                if isinstance(item, JobRecord):
                    record = item
                elif item.text or item.token_ids:
                    choice = protocol.choice(
                        endpoint, item.index, item.text, item.token_ids, item.logprobs, top,
                        None, role=item.index not in started, offset=offsets.get(item.index, 0))
                    started.add(item.index)
                    offsets[item.index] = offsets.get(item.index, 0) + len(item.text)
                    yield _sse(protocol.chunk(endpoint, job_id, created, model, [choice]))
    except StreamDiverged as exc:
        yield _sse(APIError(500, f"The stream cannot go on: {exc}", code="stream_diverged")
                   .body())
    except UNAVAILABLE as exc:
        yield _sse(_unavailable(exc).body())
    except KeyError:
        yield _sse(_gone(job_id).body())
    if record is not None:
        for text in _ending(endpoint, job_id, created, model, record, started, with_usage):
            yield text
    yield _sse("[DONE]")


def _ending(endpoint: Endpoint, job_id: str, created: int, model: str, record: JobRecord,
            started: set[int], with_usage: bool) -> list[str]:
    if record.status is not JobStatus.SUCCEEDED:
        return [_sse(protocol.job_error(record).body())]
    events = [_sse(protocol.chunk(endpoint, job_id, created, model, [
        protocol.last_choice(endpoint, c.index, c.finish_reason, role=c.index not in started)
    ])) for c in record.outputs]
    if with_usage:
        events.append(_sse(protocol.chunk(endpoint, job_id, created, model, [],
                                          protocol.usage(record))))
    return events
