"""OpenAI request bodies as pagedq jobs, and job records as OpenAI's answers (no server)."""

from datetime import UTC, datetime

import pytest

from engine.logprob import Logprob
from worker.gateway.errors import APIError
from worker.gateway.protocol import Endpoint, job_error, job_request, response_body
from worker.models import JobStatus
from worker.records import Completion, JobMetrics, JobRecord
from worker.schemas import QueueKind

MODEL = "smol"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
PROMPT = {"model": MODEL, "prompt": "Once"}


def test_chat_fields_become_the_jobs():
    job = job_request(Endpoint.CHAT, {
        **CHAT, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 2,
        "stop": "END", "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "logprobs": True, "top_logprobs": 4, "user": "u-1", "stream": True,
        "stream_options": {"include_usage": True}, "priority": 2, "top_k": 5, "min_p": 0.05,
        "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True,
        "stop_token_ids": [9], "response_format": {"type": "json_object"},
    }, model=MODEL, queue=QueueKind.BULK, custom_id="line-1")
    p = job.params
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (7, 0.5, 0.9, 2,
                                                                            ["END"], 3)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs) == (0.1, 0.2, 4)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos) == (
        5, 0.05, 1.1, 1, True)
    assert p.stop_token_ids == [9] and p.structured_outputs.json_object is True
    assert (job.priority, job.queue, job.custom_id, job.stream) == (2, QueueKind.BULK,
                                                                    "line-1", True)
    assert [m.model_dump() for m in job.messages] == [{"role": "user", "content": "Hi"}]


def test_text_parts_are_joined_and_developer_is_system():
    job = job_request(Endpoint.CHAT, {**CHAT, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"},
                                                    {"type": "text", "text": "b"}]}]},
        model=MODEL)
    assert [(m.role, m.content) for m in job.messages] == [("system", "Be brief."),
                                                            ("user", "a\nb")]


@pytest.mark.parametrize("prompt", ["Once", ["Once"], [1, 2, 3], [[1, 2, 3]]])
def test_one_prompt_in_any_of_openais_shapes(prompt):
    job = job_request(Endpoint.COMPLETIONS, {**PROMPT, "prompt": prompt}, model=MODEL)
    assert job.prompt in ("Once", [1, 2, 3])
    assert job.params.max_tokens == 16  # OpenAI's default for completions


def test_chat_without_max_tokens_runs_until_the_context_ends():
    assert job_request(Endpoint.CHAT, CHAT, model=MODEL).params.max_tokens >= 2**31 - 1


def test_json_schema_response_format_constrains_the_job():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    job = job_request(Endpoint.CHAT, {**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, model=MODEL)
    assert job.params.structured_outputs.json == schema
    plain = job_request(Endpoint.CHAT, {**CHAT, "response_format": {"type": "text"}},
                        model=MODEL)
    assert plain.params.structured_outputs is None


@pytest.mark.parametrize(("endpoint", "extra", "param"), [
    (Endpoint.CHAT, {"temperature": -1}, "temperature"),
    (Endpoint.CHAT, {"temperature": "hot"}, "temperature"),
    (Endpoint.CHAT, {"max_tokens": 0}, "max_tokens"),
    (Endpoint.CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (Endpoint.CHAT, {"n": 2, "temperature": 0}, "n"),
    (Endpoint.CHAT, {"top_logprobs": 2}, "top_logprobs"),
    (Endpoint.CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (Endpoint.CHAT, {"tools": [{"type": "function"}]}, "tools"),
    (Endpoint.CHAT, {"colour": "red"}, "colour"),
    (Endpoint.CHAT, {"stream_options": {"include_usage": True}}, "stream_options"),
    (Endpoint.CHAT, {"priority": 10}, "priority"),
    (Endpoint.CHAT, {"response_format": {"type": "xml"}}, "response_format"),
    (Endpoint.CHAT, {"response_format": {"type": "json_schema",
                                         "json_schema": {"schema": {"type": "bogus"}}}},
     "response_format"),
    (Endpoint.CHAT, {"messages": []}, "messages"),
    (Endpoint.CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    (Endpoint.CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content.0"),
    (Endpoint.CHAT, {"messages": [{"role": "user", "content": "a\x00"}]},
     "messages.0.content"),
    (Endpoint.CHAT, {"model": None}, "model"),
    (Endpoint.COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
    (Endpoint.COMPLETIONS, {"prompt": ""}, "prompt"),
    (Endpoint.COMPLETIONS, {"prompt": 5}, "prompt"),
    (Endpoint.COMPLETIONS, {"logprobs": 6}, "logprobs"),
    (Endpoint.COMPLETIONS, {"echo": True}, "echo"),
    (Endpoint.COMPLETIONS, {"messages": []}, "messages"),
    (Endpoint.COMPLETIONS, {"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_a_bad_field_is_a_400_naming_it(endpoint, extra, param):
    body = {**(CHAT if endpoint is Endpoint.CHAT else PROMPT), **extra}
    with pytest.raises(APIError) as caught:
        job_request(endpoint, body, model=MODEL)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert caught.value.message.startswith(param)


def test_another_model_is_a_404():
    with pytest.raises(APIError) as caught:
        job_request(Endpoint.CHAT, {**CHAT, "model": "gpt-4o"}, model=MODEL)
    assert (caught.value.status, caught.value.code) == (404, "model_not_found")


def test_streaming_can_be_refused():
    with pytest.raises(APIError, match="stream"):
        job_request(Endpoint.CHAT, {**CHAT, "stream": True}, model=MODEL, allow_stream=False)


def _record(status=JobStatus.SUCCEEDED, error=None, chat=True, logprobs=None,
            outputs=None) -> JobRecord:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return JobRecord(
        id="j1", status=status, queue="interactive", priority=0, attempts=1,
        cancel_requested=False, worker="w", error=error, created_at=when, started_at=when,
        finished_at=when, outputs=outputs or [], chat=chat,
        params={"logprobs": logprobs} if logprobs is not None else {},
        metrics=JobMetrics(1, 0.1, 0.2, 0.01, 0.5, prompt_tokens=5, generated_tokens=3,
                           cached_tokens=0, preemptions=0, swapped_out_blocks=0,
                           swapped_in_blocks=0))


def _positions() -> list[dict[int, Logprob]]:
    # Token 7 sampled at rank 1, then token 8 sampled at rank 3 (outside the top 1).
    return [{7: Logprob(-0.1, 1, "He"), 9: Logprob(-2.5, 2, "A")},
            {8: Logprob(-3.0, 3, "llo"), 10: Logprob(None, 1, "y")}]


def test_chat_completion_body():
    body = response_body(Endpoint.CHAT, _record(logprobs=1, outputs=[
        Completion(0, "Hello", [7, 8], "length", logprobs=_positions())]), MODEL)
    assert body["id"] == "chatcmpl-j1" and body["object"] == "chat.completion"
    assert body["created"] == int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "length"
    first, second = choice["logprobs"]["content"]
    assert first == {"token": "He", "logprob": -0.1, "bytes": list(b"He"),
                     "top_logprobs": [{"token": "He", "logprob": -0.1, "bytes": list(b"He")}]}
    assert second["token"] == "llo" and second["logprob"] == -3.0
    assert second["top_logprobs"] == [{"token": "y", "logprob": -9999.0, "bytes": [121]}]


def test_text_completion_body_with_two_choices():
    body = response_body(Endpoint.COMPLETIONS, _record(chat=False, logprobs=1, outputs=[
        Completion(0, "Hello", [7, 8], "stop", logprobs=_positions()),
        Completion(1, "Bye", [11], "length")]), MODEL)
    assert body["id"] == "cmpl-j1" and body["object"] == "text_completion"
    first, second = body["choices"]
    assert (first["index"], first["text"], first["finish_reason"]) == (0, "Hello", "stop")
    assert first["logprobs"] == {"tokens": ["He", "llo"], "token_logprobs": [-0.1, -3.0],
                                 "top_logprobs": [{"He": -0.1}, {"y": -9999.0}],
                                 "text_offset": [0, 2]}
    assert (second["index"], second["text"], second["logprobs"]) == (1, "Bye", None)


@pytest.mark.parametrize(("status", "error", "expected", "param"), [
    (JobStatus.FAILED, "invalid job: top_k must be -1, 0 (off) or ..., got -2", 400, "top_k"),
    (JobStatus.FAILED, "invalid job: structured_outputs.json is not valid JSON", 400,
     "response_format"),
    (JobStatus.FAILED, "rejected by the engine: prompt has 9000 tokens; max_model_len is "
                       "8192", 400, "messages"),
    (JobStatus.FAILED, "rejected by the engine: n must be <= 16 (...), got 20", 400, "n"),
    (JobStatus.FAILED, "deadline exceeded: still generating after 60 s", 504, None),
    (JobStatus.FAILED, "internal error: RuntimeError()", 500, None),
    (JobStatus.CANCELLED, "cancelled while running", 409, None),
    (JobStatus.EXPIRED, None, 408, None),
])
def test_job_errors(status, error, expected, param):
    problem = job_error(_record(status, error))
    assert (problem.status, problem.param) == (expected, param)
    assert problem.body()["error"]["message"]
