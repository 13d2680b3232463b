"""A batch's JSONL: the request lines of its input file, and the lines of its output
and error files, in OpenAI's shapes. Pure functions: nothing here touches SQL."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.gateway.errors import APIError
from worker.gateway.protocol import Endpoint, job_error, job_request, response_body
from worker.models import JobStatus
from worker.records import JobRecord
from worker.schemas import InvalidJob, JobRequest, QueueKind

# OpenAI's limit on the requests of one batch; it also bounds the one transaction
# that inserts a batch's jobs.
MAX_REQUESTS = 50_000
_ENDED_WITH_BATCH = {
    JobStatus.EXPIRED: ("batch_expired",
                        "This request could not be executed before the completion window "
                        "expired."),
    JobStatus.CANCELLED: ("batch_cancelled", "This request was cancelled with its batch."),
}


class _BadLine(ValueError):
    """A request line that cannot become a job; the message says why."""


@dataclass(slots=True)
class ParsedInput:
    requests: list[JobRequest] = field(default_factory=list)
    # Refused lines: {"line", "custom_id", "code", "message"} each, in file order.
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0  # request lines, valid or not (blank lines are not requests)

    def failure(self) -> list[dict[str, Any]] | None:
        """The errors of a batch that cannot start, in OpenAI's `errors.data` shape;
        None when it can (its bad lines then go to its error file)."""
        if self.total > MAX_REQUESTS:
            return [_batch_error("too_many_requests", f"The input file has {self.total} "
                                 f"requests; a batch holds at most {MAX_REQUESTS}.")]
        if not self.total:
            return [_batch_error("empty_file", "The input file has no request lines.")]
        if not self.requests:
            return [{"code": e["code"], "message": e["message"], "param": None,
                     "line": e["line"]} for e in self.errors]
        return None


def _batch_error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": None}


def parse_input(content: bytes, endpoint: Endpoint, model: str,
                check: Callable[[JobRequest], JobRequest]) -> ParsedInput:
    """Every line of an input file as a bulk job, or as a recorded error: one bad line
    costs that request only. `check`: the producer's own limits (prompt sizes)."""
    parsed = ParsedInput()
    seen: set[str] = set()
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        parsed.total += 1
        if parsed.total > MAX_REQUESTS:
            continue  # counted only: the batch fails as a whole
        custom_id = None
        try:
            line = _decode(raw)
            custom_id = _custom_id(line, seen)
            parsed.requests.append(check(_request(line, endpoint, model, custom_id)))
        except (_BadLine, InvalidJob) as exc:
            parsed.errors.append({"line": number, "custom_id": custom_id,
                                  "code": "invalid_request",
                                  "message": f"line {number}: {exc}"})
    return parsed


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        line = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadLine("not UTF-8 text") from None
    except ValueError as exc:
        raise _BadLine(f"not valid JSON ({exc})") from None
    if not isinstance(line, dict):
        raise _BadLine("must be a JSON object")
    return line


def _custom_id(line: dict[str, Any], seen: set[str]) -> str:
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _BadLine("custom_id: a non-empty string is required")
    if len(custom_id) > 255:
        raise _BadLine("custom_id: at most 255 characters")
    if custom_id in seen:
        raise _BadLine(f"custom_id: {custom_id!r} is used by an earlier line")
    seen.add(custom_id)
    return custom_id


def _request(line: dict[str, Any], endpoint: Endpoint, model: str,
             custom_id: str) -> JobRequest:
    if line.get("method") != "POST":
        raise _BadLine(f"method: must be POST, got {line.get('method')!r}")
    if line.get("url") != endpoint.value:
        raise _BadLine(f"url: must be the batch's endpoint {endpoint.value}, "
                       f"got {line.get('url')!r}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise _BadLine("body: must be a JSON object")
    try:
        return job_request(endpoint, body, model=model, queue=QueueKind.BULK,
                           custom_id=custom_id, allow_stream=False)
    except APIError as exc:
        raise _BadLine(_in_body(exc)) from None


def _in_body(exc: APIError) -> str:
    """job_request's message, its field named as the line's (`body.temperature`)."""
    if exc.param is None:
        return exc.message
    if exc.message.startswith(f"{exc.param}:"):
        return f"body.{exc.message}"
    return f"body.{exc.param}: {exc.message}"


def request_id(job_id: str) -> str:
    return f"batch_req_{job_id}"


def output_line(endpoint: Endpoint, record: JobRecord, model: str) -> dict[str, Any]:
    """The output file's line for a request that succeeded."""
    return {"id": request_id(record.id), "custom_id": record.custom_id,
            "response": {"status_code": 200, "request_id": record.id,
                         "body": response_body(endpoint, record, model)},
            "error": None}


def error_line(record: JobRecord) -> dict[str, Any]:
    """The error file's line for a request that did not succeed: a failed one has the
    HTTP answer the endpoint would have given; one its batch ended has an error."""
    ended = _ENDED_WITH_BATCH.get(record.status)
    if ended is not None:
        code, message = ended
        return {"id": request_id(record.id), "custom_id": record.custom_id,
                "response": None, "error": {"code": code, "message": message}}
    problem = job_error(record)
    return {"id": request_id(record.id), "custom_id": record.custom_id,
            "response": {"status_code": problem.status, "request_id": record.id,
                         "body": problem.body()},
            "error": None}


def bad_line(batch_id: str, error: dict[str, Any]) -> dict[str, Any]:
    """The error file's line for an input line that never became a job."""
    return {"id": f"{request_id(batch_id)}_line{error['line']}",
            "custom_id": error["custom_id"], "response": None,
            "error": {"code": error["code"], "message": error["message"]}}


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)
