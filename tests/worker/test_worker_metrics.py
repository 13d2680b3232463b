"""The worker's Prometheus endpoint: engine gauges that move while jobs run, and the
finished jobs counted, scraped over HTTP and read with prometheus-client's parser."""

import logging
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.worker.services import engine_fields, free_port, stack
from worker.metrics import WorkerMetrics
from worker.models import JobStatus


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def metered(redis_url, new_pg_database, tiny_llama_dir, tmp_path_factory):
    port = free_port()
    fields = engine_fields(tiny_llama_dir, database_url=new_pg_database(), metrics_port=port)
    with stack(fields, tmp_path_factory.mktemp("metrics-worker"), "metrics") as running:
        yield running, port


def test_engine_gauges_move_while_a_job_runs(metered):
    running, port = metered
    before = scrape(port)
    assert before[("pagedq_kv_blocks_total", ())] > 0
    job_id = running.client.submit("keep going", {"temperature": 0, "max_tokens": 400,
                                                  "ignore_eos": True})
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sample = scrape(port)
        seen.append((sample[("pagedq_requests_running", ())],
                     sample[("pagedq_kv_blocks_used", ())]))
        if seen[-1][0] > 0 and seen[-1][1] > 0:
            break
        time.sleep(0.05)
    assert seen[-1][0] == 1 and seen[-1][1] > 0, seen
    assert running.client.wait(job_id, timeout=120).status is JobStatus.SUCCEEDED
    after = scrape(port)
    assert after[("pagedq_generation_tokens_total", ())] >= \
        before[("pagedq_generation_tokens_total", ())] + 400
    assert after[("pagedq_engine_steps_total", ())] > before[("pagedq_engine_steps_total", ())]


def test_finished_jobs_are_counted_and_timed(metered):
    running, port = metered
    before = scrape(port)
    ids = [running.client.submit(f"count me {i}", {"temperature": 0, "max_tokens": 6})
           for i in range(3)]
    assert all(running.client.wait(i, timeout=120).status is JobStatus.SUCCEEDED for i in ids)

    def grew(name, labels=()):
        return scrape(port).get((name, labels), 0) - before.get((name, labels), 0)

    deadline = time.monotonic() + 10  # the worker counts a job just after its row is final
    while grew("pagedq_jobs_finished_total", (("status", "succeeded"),)) < 3 and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert grew("pagedq_jobs_finished_total", (("status", "succeeded"),)) == 3
    for histogram in ("pagedq_time_to_first_token_seconds", "pagedq_e2e_request_latency_seconds",
                      "pagedq_queue_time_seconds", "pagedq_time_per_output_token_seconds"):
        assert grew(f"{histogram}_count") == 3, histogram
        assert grew(f"{histogram}_sum") > 0, histogram
    assert grew("pagedq_prompt_tokens_total") > 0


def test_a_port_in_use_is_an_error_not_a_dead_worker(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="worker.metrics"):
            assert WorkerMetrics(dict).serve(port, "127.0.0.1") is None
    assert f"cannot serve the worker's metrics on 127.0.0.1:{port}" in caplog.text
