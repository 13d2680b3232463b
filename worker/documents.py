"""Reading bulk input (JSONL documents) and writing bulk results (JSONL lines)."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.records import JobRecord, logprobs_to_json
from worker.schemas import (
    UNSTORABLE,
    GenerationParams,
    JobRequest,
    QueueKind,
    describe,
    parse_job,
    unstorable,
)

SAMPLING_FIELDS = frozenset(GenerationParams.model_fields)
LINE_FIELDS = frozenset({"id", "prompt", "text", "messages", "priority", "response_format"})
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
    ttl_s: float | None = None  # not started this long after submission: the job expires


def check_template(template: str) -> str:
    """A template names the line's fields, e.g. "Summarize: {text}"."""
    try:
        fields = list(_field_names(template))
    except ValueError as exc:
        raise ValueError(f"template: {exc}") from None
    if not fields or any(not name or name.isdigit() for name in fields):
        raise ValueError("template: use named fields of the input line, such as {text}")
    if (problem := unstorable(template)) is not None:
        raise ValueError(f"template: {problem}")
    return template


def template_fields(template: str) -> frozenset[str]:
    """The line fields a template reads: "title" for both {title} and {title[0]}."""
    return frozenset(re.split(r"[.\[]", name, maxsplit=1)[0]
                     for name in _field_names(template))


def _field_names(template: str) -> Iterator[str]:
    # A format spec may hold fields of its own, as in "{text:>{width}}".
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            yield name
            yield from _field_names(spec or "")


def read_documents(path: Path, options: JobOptions) -> Iterator[Document | BadLine]:
    """Each line: {"id": ..., "prompt": ...}, {"id": ..., "text": ...} (placed into
    the template) or {"id": ..., "messages": [{"role": ..., "content": ...}, ...]}, plus
    optional sampling fields (`structured_outputs`, or OpenAI's `response_format` in its
    place). A bad line is yielded as BadLine."""
    allowed = LINE_FIELDS | SAMPLING_FIELDS | template_fields(options.template)
    seen: set[str] = set()
    with path.open("rb") as handle:
        for item in _decoded_lines(handle):
            if isinstance(item, BadLine):
                yield item
                continue
            number, line = item
            if not line.strip():
                continue
            try:
                document = _parse_line(line, options, allowed)
            except (ValueError, KeyError) as exc:
                yield BadLine(number, _message(exc))
                continue
            if document.id in seen:
                yield BadLine(number, f"duplicate id {document.id!r}")
                continue
            seen.add(document.id)
            yield document


def _decoded_lines(handle: Iterable[bytes]) -> Iterator[tuple[int, str] | BadLine]:
    # Each line is decoded on its own so that one bad byte costs one line.
    for number, raw in enumerate(handle, start=1):
        try:
            # utf-8-sig: some editors start the file with a byte order mark.
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield BadLine(number, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})")


def _parse_line(line: str, options: JobOptions, allowed: frozenset[str]) -> Document:
    data = _load_object(line)
    if (problem := _unstorable(data)) is not None:
        raise ValueError(problem)
    if unknown := [key for key in data if key not in allowed]:
        raise ValueError("; ".join(_unknown_field(key, allowed) for key in unknown))
    doc_id = data.get("id")
    if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or doc_id == "":
        raise ValueError("id: a non-empty string or integer is required")
    prompt, messages = None, data.get("messages")
    if not any(key in data for key in ("prompt", "text", "messages")):
        raise ValueError("needs a prompt, a text or a messages field")
    if messages is not None and ("prompt" in data or "text" in data):
        raise ValueError("messages: give them instead of a prompt or a text, not beside")
    if "prompt" in data:
        prompt = data["prompt"]
    elif "text" in data:
        if not isinstance(data["text"], str):
            raise ValueError("text: must be a string")
        prompt = _fill(options.template, data)
    params = {**(options.defaults or {}),
              **{k: v for k, v in data.items() if k in SAMPLING_FIELDS}}
    if "response_format" in data:
        if "structured_outputs" in data:
            raise ValueError("response_format: give it or structured_outputs, not both")
        params["structured_outputs"] = structure_of(data["response_format"])
    job = parse_job({"prompt": prompt, "messages": messages, "params": params,
                     "queue": options.queue, "priority": data.get("priority", options.priority),
                     "ttl_s": options.ttl_s,
                     # Messages always use the chat template; --chat wraps prompts.
                     "chat": options.chat and messages is None})
    # The key names this exact piece of work: re-running the same file resumes
    # it, while a changed prompt or parameters makes a new job.
    work = [str(doc_id), job.prompt, job.params.model_dump(), job.chat]
    if job.messages is not None:
        work.append([m.model_dump() for m in job.messages])
    digest = hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()
    return Document(str(doc_id), job.model_copy(update={"idempotency_key": f"doc:{digest}"}))


def structure_of(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's `response_format` as `structured_outputs`: {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}} constrains to the schema,
    {"type": "json_object"} to any JSON object, {"type": "text"} not at all."""
    if not isinstance(response_format, dict):
        raise ValueError("response_format: must be an object with a type")
    kind = response_format.get("type")
    expected = {"json_schema": {"type", "json_schema"}, "json_object": {"type"},
                "text": {"type"}}
    if kind not in expected:
        raise ValueError(f"response_format.type: must be 'json_schema', 'json_object' or "
                         f"'text', got {kind!r}")
    if unknown := sorted(set(response_format) - expected[kind]):
        raise ValueError(f"response_format: unknown field(s) for type {kind!r}: {unknown}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError("response_format.json_schema: must be an object with a schema "
                         "(a JSON object)")
    if unknown := sorted(set(spec) - {"name", "description", "schema", "strict"}):
        raise ValueError(f"response_format.json_schema: unknown field(s) {unknown}")
    return check_structure({"json": spec["schema"]}, "response_format.json_schema.schema")


def check_structure(structure: dict[str, Any], where: str) -> dict[str, Any]:
    """`structure` as a job's `structured_outputs` takes it; ValueError naming `where` and
    the field when the job schema or the engine's parser refuses it."""
    try:
        GenerationParams(structured_outputs=structure)
    except ValidationError as exc:
        raise ValueError(f"{where}: {describe(exc)}") from None
    return structure


def _load_object(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    except RecursionError:
        raise ValueError("not JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _reject_constant(name: str) -> Any:
    # Python's json reads these, but they are not JSON and no database stores them.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _unstorable(data: dict[str, Any]) -> str | None:
    """The first string (key or value, at any depth) the database cannot store, named
    by its dotted path; iterative, as a deep line must not exhaust the stack."""
    pending: list[tuple[str, Any]] = [("", data)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, str) and (problem := unstorable(item)) is not None:
            return f"{where}: {problem}"
        if isinstance(item, dict):
            for key, child in reversed(item.items()):
                child_path = f"{where}.{_printable(key)}" if where else _printable(key)
                pending += [(child_path, child), (f"field name {child_path}", key)]
        elif isinstance(item, list):
            pending += reversed([(f"{where}.{i}", child) for i, child in enumerate(item)])
    return None


def _printable(text: str) -> str:
    return UNSTORABLE.sub(lambda bad: f"\\u{ord(bad.group()):04x}", text)


def _unknown_field(key: str, allowed: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown field {key!r}{hint}"


def _fill(template: str, data: dict[str, Any]) -> str:
    try:
        return template.format_map(data)
    except (IndexError, AttributeError, TypeError, ValueError) as exc:
        # "{title[0]}" on a number, "{n:d}" on a string: the line does not fit the template.
        raise ValueError(f"does not fit the template ({exc})") from None


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
    first = record.outputs[0] if record.outputs else None
    line = {
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
    if first is not None and first.logprobs is not None:  # the job asked for them
        line["logprobs"] = logprobs_to_json(first.logprobs)
    if record.prompt_logprobs is not None:
        line["prompt_logprobs"] = logprobs_to_json(record.prompt_logprobs)
    return line
