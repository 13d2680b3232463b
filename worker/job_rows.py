"""The row a new job becomes: its fields from the request, and from who owns it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from worker.models import JobStatus
from worker.schemas import JobRequest


@dataclass(slots=True, frozen=True)
class JobOwner:
    """Who a set of jobs belongs to, beside what each computes."""

    api_key_id: str | None = None
    batch_id: str | None = None
    expires_at: datetime | None = None  # not started by then: the job ends expired


def storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL, which a model can generate; the exact
    # output stays in token_ids.
    return text.replace("\x00", "\ufffd")


def new_row(request: JobRequest, now: datetime, published: bool,
             owner: JobOwner) -> dict[str, Any]:
    text_prompt = isinstance(request.prompt, str)
    token_prompt = isinstance(request.prompt, list)
    return {
        "id": str(uuid.uuid4()),
        "status": JobStatus.QUEUED,
        "queue": request.queue.value,
        "priority": request.priority,
        "prompt_text": request.prompt if text_prompt else None,
        "prompt_token_ids": list(request.prompt) if token_prompt else None,
        "messages": ([m.model_dump() for m in request.messages]
                     if request.messages is not None else None),
        "params": request.params.model_dump(),
        "chat": request.chat,
        "deadline_s": request.deadline_s,
        "idempotency_key": request.idempotency_key,
        "attempts": 0,
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
        "published_at": now if published else None,
        "fingerprint": request.fingerprint(),
        "stream": request.stream,
        "custom_id": request.custom_id,
        "api_key_id": owner.api_key_id,
        "batch_id": owner.batch_id,
        "expires_at": _expiry(owner.expires_at, request.ttl_s, now),
    }


def _expiry(owner_expires_at: datetime | None, ttl_s: float | None,
            now: datetime) -> datetime | None:
    """The earlier of the owner's expiry (a batch's window) and the job's own ttl."""
    own = None if ttl_s is None else now + timedelta(seconds=ttl_s)
    times = [t for t in (owner_expires_at, own) if t is not None]
    return min(times, default=None)
