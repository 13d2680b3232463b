"""End to end: a worker subprocess on the tiny checkpoint, jobs through Redis, results in SQL."""

import re
import time

import pytest

from tests.worker.services import engine_fields, stack, wait_for
from worker.models import JobStatus

PROMPTS = [f"Job {i}: the {'quick ' * (i % 5)}brown fox number {i * 7}" for i in range(64)]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    """The same prompts through the engine in this process: what the jobs must return."""
    from engine import LLM, SamplingParams

    fields = engine_fields(tiny_llama_dir)
    llm = LLM(fields["model"], dtype="float32", device="cpu",
              num_device_blocks=fields["num_device_blocks"],
              swap_space_gib=fields["swap_space_gib"], max_num_seqs=fields["max_num_seqs"])
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs]


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def running(request, tmp_path_factory, tiny_llama_dir):
    if request.param == "postgres":
        yield request.getfixturevalue("pg_stack")
        return
    request.getfixturevalue("redis_url")
    folder = tmp_path_factory.mktemp("sqlite-worker")
    fields = engine_fields(tiny_llama_dir, database_url=f"sqlite:///{folder / 'jobs.db'}")
    with stack(fields, folder, "sqlite") as sqlite_stack:
        yield sqlite_stack


def test_64_jobs_batch_together_and_match_offline(running, offline):
    client = running.client
    ids = client.submit_many([{"prompt": p, "params": {"temperature": 0, "max_tokens": MAX_TOKENS}}
                              for p in PROMPTS])
    assert len(set(ids)) == 64
    records = [client.wait(job_id, timeout=180) for job_id in ids]
    assert [r.status for r in records] == [JobStatus.SUCCEEDED] * 64
    mismatched = [i for i, r in enumerate(records) if r.outputs[0].token_ids != offline[i]]
    assert not mismatched, [(records[i].outputs[0].token_ids, offline[i]) for i in mismatched]
    for record in records:
        m = record.metrics
        assert record.attempts == 1 and m.attempt == 1
        assert m.generated_tokens == len(record.outputs[0].token_ids)
        assert m.prompt_tokens > 0
        assert 0 <= m.queue_time_s <= m.ttft_s <= m.e2e_s
        assert m.worker == running.worker.hostname
    stats = running.worker.engine_stats(client)
    assert stats["peak_running"] >= 8, stats
    assert stats["kv_blocks_used"] == 0  # every block freed once the jobs finished


def test_cancel_a_long_job_leaves_the_others_alone(pg_stack):
    client = pg_stack.client
    long_job = client.submit("a very long story", {"max_tokens": 900, "ignore_eos": True})
    others = client.submit_many([{"prompt": f"short {i}", "params": {"max_tokens": 6}}
                                 for i in range(4)])
    wait_for(lambda: client.get(long_job).status is JobStatus.RUNNING)
    started = time.monotonic()
    assert client.cancel(long_job)
    record = client.wait(long_job, timeout=2)
    assert time.monotonic() - started < 2
    assert record.status is JobStatus.CANCELLED
    assert record.outputs[0].finish_reason == "abort"
    assert all(client.wait(j, timeout=60).status is JobStatus.SUCCEEDED for j in others)
    assert not client.cancel(long_job)  # already finished


def test_cancel_a_queued_job(pg_stack):
    client = pg_stack.client
    # Flood the worker so that the last job is still queued when cancelled.
    ids = client.submit_many([{"prompt": f"filler {i}", "params": {"max_tokens": 8}}
                              for i in range(24)])
    assert client.cancel(ids[-1])
    assert client.wait(ids[-1], timeout=60).status is JobStatus.CANCELLED
    assert all(client.wait(j, timeout=120).status is JobStatus.SUCCEEDED for j in ids[:-1])


def test_deadline_exceeded_fails_with_a_clear_error(pg_stack):
    client = pg_stack.client
    job_id = client.submit("never ending", {"max_tokens": 900, "ignore_eos": True},
                           deadline_s=0.5)
    record = client.wait(job_id, timeout=30)
    assert record.status is JobStatus.FAILED
    assert "deadline exceeded" in record.error and "0.5 s" in record.error
    assert record.metrics is not None and record.metrics.e2e_s < 10


def test_prompt_longer_than_the_model_fails_without_retry(pg_stack):
    client = pg_stack.client
    job_id = client.submit("word " * 3000, {"max_tokens": 4})
    record = client.wait(job_id, timeout=30)
    assert record.status is JobStatus.FAILED and record.attempts == 1
    assert "max_model_len" in record.error


def test_chat_template_is_applied_by_the_worker(pg_stack):
    client = pg_stack.client
    plain = client.wait(client.submit("Hi", {"max_tokens": 4, "temperature": 0}), timeout=30)
    chat = client.wait(client.submit("Hi", {"max_tokens": 4, "temperature": 0}, chat=True),
                       timeout=30)
    assert plain.status is chat.status is JobStatus.SUCCEEDED
    assert chat.metrics.prompt_tokens > plain.metrics.prompt_tokens


def test_messages_with_a_system_prompt_are_rendered_by_the_chat_template(pg_stack,
                                                                         tiny_llama_dir):
    from engine import LLM, SamplingParams

    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Colour of the sky?"},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And grass?"}]
    client = pg_stack.client
    record = client.wait(client.submit(messages=messages,
                                       params={"max_tokens": 6, "temperature": 0}), timeout=30)
    assert record.status is JobStatus.SUCCEEDED
    # What the worker must have run: the template's rendering, generated offline.
    fields = engine_fields(tiny_llama_dir)
    llm = LLM(fields["model"], dtype="float32", device="cpu",
              num_device_blocks=fields["num_device_blocks"], swap_space_gib=0.01)
    rendered = llm.get_tokenizer().apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=True)
    assert "You answer in one word." in rendered and "And grass?" in rendered
    offline = llm.generate([rendered], SamplingParams(temperature=0, max_tokens=6),
                           use_tqdm=False)[0]
    assert record.outputs[0].token_ids == offline.outputs[0].token_ids
    assert record.metrics.prompt_tokens == len(offline.prompt_token_ids)


def test_n_samples_and_beam_search_jobs_return_what_the_engine_returns(pg_stack,
                                                                        tiny_llama_dir):
    from engine import LLM, BeamSearchParams, SamplingParams

    client = pg_stack.client
    sampled = client.submit("Once upon a time", {"n": 3, "temperature": 0.9, "seed": 7,
                                                 "max_tokens": 6})
    beams = client.submit("Once upon a time", {"beam_width": 3, "max_tokens": 6,
                                               "length_penalty": 0.5})
    sampled, beams = client.wait(sampled, timeout=30), client.wait(beams, timeout=30)
    assert sampled.status is beams.status is JobStatus.SUCCEEDED
    fields = engine_fields(tiny_llama_dir)
    llm = LLM(fields["model"], dtype="float32", device="cpu",
              num_device_blocks=fields["num_device_blocks"], swap_space_gib=0.01)
    want = llm.generate(["Once upon a time"], SamplingParams(n=3, temperature=0.9, seed=7,
                                                             max_tokens=6), use_tqdm=False)[0]
    assert [o.index for o in sampled.outputs] == [0, 1, 2]
    assert [o.token_ids for o in sampled.outputs] == [o.token_ids for o in want.outputs]
    want = llm.beam_search(["Once upon a time"], BeamSearchParams(
        beam_width=3, max_tokens=6, length_penalty=0.5))[0]
    assert [o.token_ids for o in beams.outputs] == [o.token_ids for o in want.outputs]
    scores = [o.score for o in beams.outputs]
    assert scores == pytest.approx([o.score for o in want.outputs], abs=1e-5)
    assert scores == sorted(scores, reverse=True) and len(scores) == 3


def test_structured_output_jobs_follow_their_constraint(pg_stack):
    client = pg_stack.client
    choice = client.submit("Yes or no?", {"max_tokens": 8, "temperature": 0,
                                          "structured_outputs": {"choice": ["yes", "no"]}})
    regex = client.submit("A code:", {"max_tokens": 8, "temperature": 0.9, "seed": 3,
                                      "structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    choice, regex = client.wait(choice, timeout=60), client.wait(regex, timeout=60)
    assert choice.status is regex.status is JobStatus.SUCCEEDED
    assert choice.text in ("yes", "no") and choice.outputs[0].finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.text)


def test_a_logprobs_job_stores_what_the_engine_returns(pg_stack, tiny_llama_dir):
    from engine import LLM, SamplingParams

    client = pg_stack.client
    params = {"temperature": 0, "max_tokens": 5, "logprobs": 2}
    record = client.wait(client.submit("The logprobs of", params), timeout=30)
    assert record.status is JobStatus.SUCCEEDED
    fields = engine_fields(tiny_llama_dir)
    llm = LLM(fields["model"], dtype="float32", device="cpu",
              num_device_blocks=fields["num_device_blocks"], swap_space_gib=0.01)
    want = llm.generate(["The logprobs of"], SamplingParams(**params), use_tqdm=False)[0]
    got, want = record.outputs[0], want.outputs[0]
    assert got.token_ids == want.token_ids and len(got.logprobs) == 5
    for stored, engine_step in zip(got.logprobs, want.logprobs, strict=True):
        assert stored.keys() == engine_step.keys()
        for token, lp in stored.items():
            assert lp.logprob == pytest.approx(engine_step[token].logprob, abs=1e-5)
            assert (lp.rank, lp.decoded_token) == (engine_step[token].rank,
                                                   engine_step[token].decoded_token)
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-5)
    plain = client.wait(client.submit("The logprobs of", {"max_tokens": 2}), timeout=30)
    assert plain.outputs[0].logprobs is None and plain.prompt_logprobs is None
    prompt = client.wait(client.submit("The prompt logprobs of this",
                                       {"max_tokens": 1, "prompt_logprobs": 1}), timeout=30)
    want = llm.generate(["The prompt logprobs of this"],
                        SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert prompt.prompt_logprobs[0] is None is want.prompt_logprobs[0]
    assert len(prompt.prompt_logprobs) == len(want.prompt_logprobs) > 2
    for stored, engine_step in zip(prompt.prompt_logprobs[1:], want.prompt_logprobs[1:],
                                   strict=True):
        assert stored.keys() == engine_step.keys()
        for token, lp in stored.items():
            assert lp.logprob == pytest.approx(engine_step[token].logprob, abs=1e-5)
            assert lp.rank == engine_step[token].rank


def test_interactive_queue_is_drained_before_bulk(pg_stack):
    client = pg_stack.client
    # Submitted one by one, a message each: submitted together, they would share one.
    bulk = [client.submit(f"bulk {i}", {"max_tokens": 6}, queue="bulk") for i in range(24)]
    urgent = client.submit_many([{"prompt": f"urgent {i}", "params": {"max_tokens": 6}}
                                 for i in range(8)])
    last_urgent = max(client.wait(j, timeout=60).started_at for j in urgent)
    bulk_started = [client.wait(j, timeout=120).started_at for j in bulk]
    # Only bulk jobs the worker's threads already held may start before the last
    # interactive one; alternating between the queues would let 7 more through.
    ahead = sum(started < last_urgent for started in bulk_started)
    assert ahead <= pg_stack.settings.concurrency, ahead
