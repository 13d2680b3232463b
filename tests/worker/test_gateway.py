"""`pagedq serve` through the official OpenAI SDK (sync and async), against a real worker
on SmolLM2, Redis and PostgreSQL: answers, streaming, keys, errors, cancel, metrics."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from tests.worker.gateway_server import new_key, running_gateway
from tests.worker.services import Stack, engine_fields, private_queues, stack
from worker.keys import KeyStore
from worker.models import Job, JobStatus
from worker.settings import load_settings

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Say hello."}]
TOKENS = 12  # SmolLM2 in float32 on a shared CPU: answers stay short


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path, new_pg_database, redis_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fields = engine_fields(smollm2_dir, database_url=new_pg_database(),
                           served_model_name=MODEL)
    with stack(fields, tmp_path_factory.mktemp("gateway"), "gateway") as running:
        yield running


@pytest.fixture(scope="module")
def url(smol: Stack) -> Iterator[str]:
    with running_gateway(smol.settings) as base:
        yield base


@pytest.fixture(scope="module")
def key(smol: Stack) -> str:
    return new_key(smol.settings, "tests")


@pytest.fixture(scope="module")
def api(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def job_id(response_id: str) -> str:
    return response_id.split("-", 1)[1]


def test_models_list(api: openai.OpenAI):
    assert [m.id for m in api.models.list()] == [MODEL]
    assert api.models.retrieve(MODEL).owned_by == "pagedq"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")


def test_greedy_chat_streams_the_text_it_answers(api: openai.OpenAI, smol: Stack):
    answer = api.chat.completions.create(model=MODEL, messages=HELLO, temperature=0,
                                         max_tokens=TOKENS)
    assert answer.object == "chat.completion" and answer.model == MODEL
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    record = smol.client.get(job_id(answer.id))
    assert record.text == choice.message.content
    assert answer.usage.completion_tokens == len(record.outputs[0].token_ids)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(api.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=TOKENS, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(p or "" for p in pieces) == choice.message.content
    assert len([p for p in pieces if p]) > 1  # the text came as it was generated
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == []  # the usage chunk comes last
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_completion_with_logprobs_streams_the_same_text(api: openai.OpenAI):
    answer = api.completions.create(model=MODEL, prompt="The capital of France is",
                                    temperature=0, max_tokens=8, logprobs=2)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    [choice] = answer.choices
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == answer.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert logprobs.text_offset[0] == 0
    chunks = list(api.completions.create(model=MODEL, prompt="The capital of France is",
                                         temperature=0, max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_two_choices_with_top_logprobs(api: openai.OpenAI):
    answer = api.chat.completions.create(model=MODEL, messages=HELLO, n=2, temperature=1.0,
                                         seed=7, max_completion_tokens=6, logprobs=True,
                                         top_logprobs=3)
    assert sorted(c.index for c in answer.choices) == [0, 1]
    total = 0
    for choice in answer.choices:
        content = choice.logprobs.content
        total += len(content)
        assert content and all(len(token.top_logprobs) == 3 for token in content)
        assert all(token.top_logprobs[0].logprob >= token.logprob for token in content)
    assert answer.usage.completion_tokens == total


def test_json_schema_response_format(api: openai.OpenAI):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    answer = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}],
        max_tokens=16, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def _status(url: str, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_keys_are_required(url: str, smol: Stack):
    status, body = _status(url, {})
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="pq-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    revoked = new_key(smol.settings, "revoked")
    keys = KeyStore(smol.settings.database_url)
    keys.revoke("revoked")
    keys.close()
    assert _status(url, {"Authorization": f"Bearer {revoked}"})[0] == 401


def test_bad_fields_and_models_are_named(api: openai.OpenAI):
    cases = [({"temperature": -1}, "temperature"), ({"extra_body": {"colour": 1}}, "colour"),
             ({"extra_body": {"top_k": -5}}, "top_k"), ({"tools": [{"type": "function",
               "function": {"name": "f"}}]}, "tools")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, **extra)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert caught.value.body["code"] == "model_not_found"


def test_a_job_the_engine_refuses(api: openai.OpenAI):
    # More samples than the worker's max_num_seqs (16): valid to store, refused to run.
    wide = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "n": 17}
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(**wide)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.APIError, match="n must be <= 16"):  # an error event
        list(api.chat.completions.create(**wide, stream=True))


def test_a_client_that_goes_away_cancels_its_job(api: openai.OpenAI, url: str, key: str,
                                                 smol: Stack):
    long = {"model": MODEL, "messages": HELLO, "max_tokens": 2000,
            "extra_body": {"ignore_eos": True}}
    with api.chat.completions.create(**long, stream=True) as stream:
        first = next(iter(stream))
    assert smol.client.wait(job_id(first.id), timeout=30).status is JobStatus.CANCELLED

    impatient = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(**long)
    # A client that timed out never learnt its job's id: it is the newest job.
    assert smol.client.wait(_newest_job(smol), timeout=30).status is JobStatus.CANCELLED


def _newest_job(smol: Stack) -> str:
    with smol.client.store.engine.connect() as db:
        return db.scalar(select(Job.id).order_by(Job.created_at.desc()).limit(1))


def test_concurrent_async_streams(url: str, key: str, smol: Stack):
    async def one(client: openai.AsyncOpenAI, subject: str) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Name a {subject}."}],
            temperature=0, max_tokens=8, stream=True)
        parts, ident = [], ""
        async for chunk in stream:
            ident = chunk.id
            parts += [c.delta.content or "" for c in chunk.choices]
        return job_id(ident), "".join(parts)

    async def main() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as c:
            return await asyncio.gather(*(one(c, s) for s in ("colour", "fruit", "city")))

    for ident, text in asyncio.run(main()):
        assert text and smol.client.get(ident).text == text


def test_queue_limit_and_unavailable_broker(smol: Stack, key: str):
    # Queues no worker drains: the first job stays queued and fills the limit of one.
    idle = load_settings(**{**smol.fields, **private_queues(), "max_queued_jobs": 1})
    with running_gateway(idle) as base:
        api = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        with api.chat.completions.create(model=MODEL, messages=HELLO, stream=True) as stream:
            waiting = stream.response  # the job is queued once the answer has begun
            assert waiting.status_code == 200
            time.sleep(1.1)  # the queued-jobs count is at most a second old
            with pytest.raises(openai.RateLimitError):
                api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    gone = load_settings(**{**smol.fields, "broker_url": "redis://127.0.0.1:1/0"})
    with running_gateway(gone) as base:
        api = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            api.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert caught.value.status_code == 503


def test_metrics(url: str, key: str, api: openai.OpenAI, smol: Stack):
    api.models.list()
    request = urllib.request.Request(f"{url}/metrics",
                                     headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value
                for s in families["pagedq_gateway_requests"].samples
                if s.name.endswith("_total")}
    assert requests[("/v1/chat/completions", "200")] >= 3
    assert requests[("/v1/chat/completions", "400")] >= 3
    assert requests[("/v1/models", "200")] >= 1
    assert ("/v1/models/{model_id}", "404") in requests
    latency = families["pagedq_gateway_request_duration_seconds"].samples
    assert any(s.name.endswith("_count") and s.labels["endpoint"] == "/v1/completions"
               for s in latency)
    jobs = {(s.labels["status"], s.labels["queue"]): s.value
            for s in families["pagedq_jobs"].samples}
    assert jobs[("succeeded", "interactive")] >= 3 and jobs[("cancelled", "interactive")] >= 1
    depth = {s.labels["queue"] for s in families["pagedq_queue_depth"].samples}
    assert smol.settings.interactive_queue in depth
