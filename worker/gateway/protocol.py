"""OpenAI's chat and completions bodies as pagedq jobs, and finished jobs as OpenAI's
answers: the one mapping, used by the HTTP endpoints and by batch lines alike.

Accepted: OpenAI's sampling fields (their meanings are the engine's), `response_format`,
logprobs, `stream`/`stream_options`, `user` (ignored), and pagedq's own knobs as extra
top-level fields. Refused with a 400 naming the field: anything else, tools and other
features the engine does not have, and several prompts in one completions request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC
from enum import StrEnum
from typing import Any

from engine.logprob import Logprob
from worker.documents import structure_of
from worker.gateway.errors import APIError
from worker.models import JobStatus
from worker.records import JobRecord
from worker.schemas import GenerationParams, InvalidJob, JobRequest, QueueKind, parse_job


class Endpoint(StrEnum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


# OpenAI's fields that are the engine's fields, names and meanings alike.
_SAMPLING = ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty",
             "stop")
# pagedq's knobs beyond OpenAI's, given as extra top-level fields.
_EXTRAS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
           "stop_token_ids")
_COMMON = frozenset({"model", "max_tokens", "logprobs", "response_format", "stream",
                     "stream_options", "user", "priority", *_SAMPLING, *_EXTRAS})
_FIELDS = {Endpoint.CHAT: _COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
           Endpoint.COMPLETIONS: _COMMON | {"prompt"}}
# OpenAI features the engine does not have: said so rather than "unknown".
_UNSUPPORTED = frozenset({"tools", "tool_choice", "functions", "function_call",
                          "parallel_tool_calls", "logit_bias", "audio", "modalities",
                          "prediction", "web_search_options", "reasoning_effort", "echo",
                          "suffix", "best_of"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI bounds it
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI bounds it
# Without max_tokens a chat answer runs until the model's context ends, as OpenAI's
# does (the engine stops at max_model_len); completions default to 16, as OpenAI's.
_DEFAULT_MAX_TOKENS = {Endpoint.CHAT: 2**31 - 1, Endpoint.COMPLETIONS: 16}
# OpenAI's logprob for a token that cannot occur (JSON has no -inf).
_IMPOSSIBLE = -9999.0


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def job_request(endpoint: Endpoint, body: dict[str, Any], *, model: str,
                queue: QueueKind = QueueKind.INTERACTIVE, custom_id: str | None = None,
                allow_stream: bool = True) -> JobRequest:
    """An OpenAI request body as a pagedq job; APIError naming the field if it is wrong
    (404 model_not_found for another model)."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    given = {name: value for name, value in body.items() if value is not None}
    _check_names(endpoint, given)
    _check_model(given, model)
    job: dict[str, Any] = {"params": _params(endpoint, given), "queue": queue,
                           "custom_id": custom_id, "stream": _stream(given, allow_stream),
                           "priority": given.get("priority", 0)}
    if endpoint is Endpoint.CHAT:
        job["messages"] = _messages(given.get("messages"))
    else:
        job["prompt"] = _prompt(given.get("prompt"))
    try:
        return parse_job(job)
    except InvalidJob as exc:
        raise invalid_job(endpoint, str(exc), given) from None


def _check_names(endpoint: Endpoint, given: dict[str, Any]) -> None:
    for name in given:
        if name in _UNSUPPORTED:
            raise _bad(name, "not supported by this server")
        if name not in _FIELDS[endpoint]:
            raise _bad(name, f"unknown field for {endpoint.value}")


def _check_model(given: dict[str, Any], model: str) -> None:
    asked = given.get("model")
    if asked is None:
        raise _bad("model", "required")
    if asked != model:
        raise APIError(404, f"The model '{asked}' does not exist; this server serves "
                            f"'{model}'.", param="model", code="model_not_found")


def _stream(given: dict[str, Any], allow_stream: bool) -> bool:
    stream = given.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    if stream and not allow_stream:
        raise _bad("stream", "not supported here")
    options = given.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", "must be an object with include_usage only")
        if not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options.include_usage", "must be a boolean")
    return stream


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed answer ends with a usage chunk (body already checked)."""
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _params(endpoint: Endpoint, given: dict[str, Any]) -> dict[str, Any]:
    params = {name: given[name] for name in (*_SAMPLING, *_EXTRAS) if name in given}
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    max_tokens = given.get("max_completion_tokens", given.get("max_tokens"))
    params["max_tokens"] = _DEFAULT_MAX_TOKENS[endpoint] if max_tokens is None else max_tokens
    logprobs = (_chat_logprobs if endpoint is Endpoint.CHAT else _completion_logprobs)(given)
    if logprobs is not None:
        params["logprobs"] = logprobs
    if "response_format" in given:
        try:
            structure = structure_of(given["response_format"])
        except ValueError as exc:
            raise APIError(400, str(exc), param="response_format") from None
        if structure is not None:
            params["structured_outputs"] = structure
    if not isinstance(given.get("user", ""), str):
        raise _bad("user", "must be a string")
    return params


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chat_logprobs(given: dict[str, Any]) -> int | None:
    """Chat asks with logprobs: true, plus top_logprobs alternatives per token."""
    wanted, top = given.get("logprobs", False), given.get("top_logprobs")
    if not isinstance(wanted, bool):
        raise _bad("logprobs", "must be a boolean (top_logprobs gives the count)")
    if top is not None and not (_is_int(top) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise _bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    if top is not None and not wanted:
        raise _bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if wanted else None


def _completion_logprobs(given: dict[str, Any]) -> int | None:
    count = given.get("logprobs")
    if count is not None and not (_is_int(count) and 0 <= count <= MAX_COMPLETION_LOGPROBS):
        raise _bad("logprobs", f"must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
    return count


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages is required")
    return [_message(message, f"messages.{i}") for i, message in enumerate(messages)]


def _message(message: Any, where: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise _bad(where, "must be an object with a role and a content")
    for name in message:
        if name not in ("role", "content", "name"):  # a name is accepted and ignored
            raise _bad(f"{where}.{name}", "not supported by this server")
    role = message.get("role")
    if role in ("tool", "function"):
        raise _bad(f"{where}.role", f"{role!r} messages are not supported (no tool calls)")
    if role not in _ROLES:
        raise _bad(f"{where}.role", f"must be one of {sorted(_ROLES)}, got {role!r}")
    return {"role": _ROLES[role], "content": _content(message.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(where, "must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _bad(f"{where}.{j}", f"only text parts are supported, got type {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(prompt: Any) -> str | list[int]:
    """One prompt: a string or token ids, possibly as a list of one of them."""
    if prompt is None:
        raise _bad("prompt", "required")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) > 1:
            raise _bad("prompt", f"one prompt per request (got {len(prompt)}); send one "
                                 "request each, or a batch")
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(map(_is_int, prompt))):
        return prompt
    raise _bad("prompt", "must be a string, a list of token ids, or a list of one of them")


def invalid_job(endpoint: Endpoint, message: str, given: dict[str, Any] | None = None
                ) -> APIError:
    """pagedq's own rejection ("params.top_p: ...", "job 0: prompt: ...") as a 400 whose
    param is the request's field."""
    message = re.sub(r"^job \d+: ", "", message)
    path, sep, _ = message.partition(":")
    if not sep or " " in path:
        return APIError(400, message)
    param = _request_field(endpoint, path, given or {})
    return APIError(400, param + message[len(path):], param=param)


def _request_field(endpoint: Endpoint, path: str, given: dict[str, Any]) -> str:
    """The request field that a job field's path comes from."""
    if not path.startswith("params."):
        return path
    name = path.removeprefix("params.")
    top = name.split(".", 1)[0]
    if top == "structured_outputs":
        return "response_format"
    if top == "max_tokens":
        return "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
    if top == "logprobs" and endpoint is Endpoint.CHAT:
        return "top_logprobs"
    return name


def job_error(record: JobRecord) -> APIError:
    """What a job that did not succeed answers: its input was wrong (400), it ran out of
    time (504), it was cancelled or expired before it ran, or it failed (500)."""
    error = record.error or ""
    if record.status is JobStatus.CANCELLED:
        return APIError(409, f"The request was cancelled ({error or 'by its owner'}).",
                        code="cancelled")
    if record.status is JobStatus.EXPIRED:
        return APIError(408, "The request was not started before its window expired.",
                        code="expired")
    if record.status is not JobStatus.FAILED:
        return APIError(500, f"The job is {record.status.value}, not finished.")
    for prefix in ("invalid job: ", "rejected by the engine: "):
        if error.startswith(prefix):
            return _rejected(record, error.removeprefix(prefix))
    if error.startswith("deadline exceeded"):
        return APIError(504, f"The request ran out of time: {error}.", code="deadline_exceeded")
    return APIError(500, f"The request failed: {error}", code="job_failed")


def _rejected(record: JobRecord, reason: str) -> APIError:
    """The engine's checks name the field first ("prompt has 5000 tokens; ...")."""
    first = re.split(r"[ :]", reason, maxsplit=1)[0].removeprefix("params.")
    endpoint = Endpoint.CHAT if record.chat else Endpoint.COMPLETIONS
    if first in ("prompt", "messages", "chat"):
        param = "messages" if record.chat else "prompt"
    elif first.split(".")[0] in GenerationParams.model_fields:
        param = _request_field(endpoint, f"params.{first}", {})
    else:
        param = None
    return APIError(400, reason, param=param)


def response_id(endpoint: Endpoint, job_id: str) -> str:
    return f"{'chatcmpl' if endpoint is Endpoint.CHAT else 'cmpl'}-{job_id}"


def created_at(record: JobRecord) -> int:
    when = record.created_at
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def usage(record: JobRecord) -> dict[str, int]:
    m = record.metrics
    prompt, generated = (m.prompt_tokens, m.generated_tokens) if m else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}


def response_body(endpoint: Endpoint, record: JobRecord, model: str) -> dict[str, Any]:
    """The chat.completion or text_completion object of a job that succeeded."""
    top = record.params.get("logprobs")
    choices = [
        choice(endpoint, c.index, c.text, c.token_ids, c.logprobs, top, c.finish_reason)
        for c in record.outputs
    ]
    for entry in choices:  # a whole answer, not a delta
        if endpoint is Endpoint.CHAT:
            entry["message"] = entry.pop("delta")
    return {"id": response_id(endpoint, record.id),
            "object": "chat.completion" if endpoint is Endpoint.CHAT else "text_completion",
            "created": created_at(record), "model": model, "choices": choices,
            "usage": usage(record)}


def choice(endpoint: Endpoint, index: int, text: str, token_ids: Sequence[int],
           logprobs: Sequence[dict[int, Logprob]] | None, top: int | None,
           finish_reason: str | None, *, role: bool = True, offset: int = 0
           ) -> dict[str, Any]:
    """One choice: a chat `delta` (a streamed chunk's; a whole answer's `message`), or a
    completion's `text`. `offset`: where `text` starts in the completion's whole text."""
    if endpoint is Endpoint.CHAT:
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        return {"index": index, "delta": delta,
                "logprobs": _chat_logprobs_of(token_ids, logprobs, top),
                "finish_reason": finish_reason}
    return {"index": index, "text": text,
            "logprobs": _completion_logprobs_of(token_ids, logprobs, top, offset),
            "finish_reason": finish_reason}


def last_choice(endpoint: Endpoint, index: int, finish_reason: str | None,
                role: bool = False) -> dict[str, Any]:
    """A streamed choice's last chunk: no new text, its finish_reason."""
    if endpoint is Endpoint.CHAT:
        delta = {"role": "assistant", "content": ""} if role else {}
        return {"index": index, "delta": delta, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}


def _ranked(position: dict[int, Logprob], top: int) -> list[tuple[int, Logprob]]:
    # A position holds the sampled token and the `top` most likely ones.
    return sorted(position.items(), key=lambda item: item[1].rank)[:top]


def _value(lp: Logprob | None) -> float:
    return _IMPOSSIBLE if lp is None or lp.logprob is None else lp.logprob


def _token(lp: Logprob | None) -> str:
    return "" if lp is None or lp.decoded_token is None else lp.decoded_token


def _entry(lp: Logprob | None) -> dict[str, Any]:
    token = _token(lp)
    return {"token": token, "logprob": _value(lp), "bytes": list(token.encode())}


def _chat_logprobs_of(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]] | None,
                      top: int | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = [{**_entry(position.get(token)),
                "top_logprobs": [_entry(lp) for _, lp in _ranked(position, top or 0)]}
               for token, position in zip(token_ids, logprobs, strict=False)]
    return {"content": content, "refusal": None}


def _completion_logprobs_of(token_ids: Sequence[int],
                            logprobs: Sequence[dict[int, Logprob]] | None, top: int | None,
                            offset: int) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for token, position in zip(token_ids, logprobs, strict=False):
        sampled = position.get(token)
        offsets.append(offset)
        offset += len(_token(sampled))
        tokens.append(_token(sampled))
        values.append(_value(sampled))
        tops.append({_token(lp): _value(lp) for _, lp in _ranked(position, top or 0)})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def chunk(endpoint: Endpoint, job_id: str, created: int, model: str,
          choices: list[dict[str, Any]], totals: dict[str, int] | None = None
          ) -> dict[str, Any]:
    """A streamed chat.completion.chunk, or a streamed text_completion."""
    body: dict[str, Any] = {
        "id": response_id(endpoint, job_id),
        "object": "chat.completion.chunk" if endpoint is Endpoint.CHAT else "text_completion",
        "created": created, "model": model, "choices": choices}
    if totals is not None:
        body["usage"] = totals
    return body
