"""Reading bulk input (JSONL documents) and writing bulk results (JSONL lines)."""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.records import JobRecord
from worker.schemas import GenerationParams, JobRequest, QueueKind, parse_job

SAMPLING_FIELDS = frozenset(GenerationParams.model_fields)
DEFAULT_TEMPLATE = "{text}"


@dataclass(slots=True)
class Document:
    id: str
    request: JobRequest


@dataclass(slots=True)
class BadLine:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(slots=True)
class JobOptions:
    """How every document of one bulk run becomes a job."""

    template: str = DEFAULT_TEMPLATE
    chat: bool = False
    queue: QueueKind = QueueKind.BULK
    priority: int = 0
    defaults: dict[str, Any] | None = None  # sampling fields for lines that lack them


def check_template(template: str) -> str:
    """A template names the line's fields, e.g. "Summarize: {text}"."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"template: {exc}") from None
    if not fields or any(not name or name.isdigit() for name in fields):
        raise ValueError("template: use named fields of the input line, such as {text}")
    return template


def read_documents(path: Path, options: JobOptions) -> Iterator[Document | BadLine]:
    """Each line: {"id": ..., "prompt": ...} or {"id": ..., "text": ...} (placed into
    the template) plus optional sampling fields. A bad line is yielded as BadLine."""
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                document = _parse_line(line, options)
            except (ValueError, KeyError) as exc:
                yield BadLine(number, _message(exc))
                continue
            if document.id in seen:
                yield BadLine(number, f"duplicate id {document.id!r}")
                continue
            seen.add(document.id)
            yield document


def _parse_line(line: str, options: JobOptions) -> Document:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    doc_id = data.get("id")
    if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or doc_id == "":
        raise ValueError("id: a non-empty string or integer is required")
    if "prompt" in data:
        prompt = data["prompt"]
    elif "text" in data:
        if not isinstance(data["text"], str):
            raise ValueError("text: must be a string")
        prompt = options.template.format_map(data)
    else:
        raise ValueError("needs a prompt or a text field")
    params = {**(options.defaults or {}),
              **{k: v for k, v in data.items() if k in SAMPLING_FIELDS}}
    job = parse_job({"prompt": prompt, "params": params, "queue": options.queue,
                     "priority": data.get("priority", options.priority), "chat": options.chat})
    # The key names this exact piece of work: re-running the same file resumes
    # it, while a changed prompt or parameters makes a new job.
    digest = hashlib.sha256(json.dumps(
        [str(doc_id), job.prompt, job.params.model_dump(), job.chat], sort_keys=True
    ).encode()).hexdigest()
    return Document(str(doc_id), job.model_copy(update={"idempotency_key": f"doc:{digest}"}))


def _message(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"template field {exc} is missing from the line"
    return str(exc)


def finished_ids(path: Path) -> set[str]:
    """Ids already written to an output file (a partly written last line is ignored)."""
    if not path.exists():
        return set()
    done = set()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def result_line(doc_id: str, record: JobRecord) -> dict[str, Any]:
    m = record.metrics
    return {
        "id": doc_id,
        "text": record.text,
        "finish_reason": record.outputs[0].finish_reason if record.outputs else None,
        "prompt_tokens": m.prompt_tokens if m else None,
        "completion_tokens": m.generated_tokens if m else None,
        "job_id": record.id,
        "ttft_s": m.ttft_s if m else None,
        "e2e_s": m.e2e_s if m else None,
        "cached_tokens": m.cached_tokens if m else None,
        "preemptions": m.preemptions if m else None,
    }
