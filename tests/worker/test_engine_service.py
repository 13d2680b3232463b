"""The engine loop thread: jobs from many threads share one engine; cancels never get lost."""

from concurrent.futures import wait

import pytest

from worker.engine_service import EngineService, JobCancelled


@pytest.fixture(scope="module")
def service(tiny_llama_dir):
    from engine import EngineConfig, LLMEngine

    service = EngineService(lambda: LLMEngine(EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", device="cpu", num_device_blocks=256,
        swap_space_gib=0.05, max_num_seqs=16)))
    service.start()
    yield service
    service.stop(timeout=30)


def params(**fields):
    from engine import SamplingParams

    return SamplingParams(**{"temperature": 0, "max_tokens": 6, **fields})


def test_submissions_from_many_threads_run_in_one_batch(service):
    futures = [service.submit(f"job-{i}", 1, f"prompt {i}", params()) for i in range(12)]
    done, _ = wait(futures, timeout=60)
    assert len(done) == 12
    assert all(len(f.result().output.outputs[0].token_ids) == 6 for f in futures)
    assert service.stats()["peak_running"] >= 8
    assert service.stats()["kv_blocks_used"] == 0


def test_cancel_that_overtakes_its_job_still_cancels_it(service):
    service.cancel("early")
    with pytest.raises(JobCancelled):
        service.submit("early", 1, "too late", params()).result(timeout=10)


def test_cancel_aborts_a_running_request(service):
    future = service.submit("long", 1, "go on", params(max_tokens=900, ignore_eos=True))
    service.cancel("long")
    generation = future.result(timeout=10)
    assert generation.cancelled
    assert generation.output.outputs[0].finish_reason == "abort"


def test_bad_request_fails_alone(service):
    bad = service.submit("bad", 1, "word " * 3000, params())
    good = service.submit("good", 1, "fine", params())
    with pytest.raises(ValueError, match="max_model_len"):
        bad.result(timeout=10)
    assert good.result(timeout=30).output.finished


def test_deadline_is_enforced_by_the_engine(service):
    import time

    generation = service.submit("slow", 1, "forever", params(max_tokens=900, ignore_eos=True),
                                deadline=time.time() + 0.2).result(timeout=10)
    assert not generation.cancelled
    assert generation.output.abort_reason == "deadline exceeded"


def test_stop_lets_running_requests_finish(tiny_llama_dir):
    from engine import EngineConfig, LLMEngine

    service = EngineService(lambda: LLMEngine(EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", device="cpu", num_device_blocks=64,
        swap_space_gib=0.05, max_num_seqs=4)))
    service.start()
    future = service.submit("last", 1, "finish me", params(max_tokens=12))
    service.stop(timeout=30)
    assert len(future.result(timeout=0).output.outputs[0].token_ids) == 12
    with pytest.raises(RuntimeError, match="shutting down"):
        service.submit("after", 1, "too late", params()).result(timeout=1)


class ExplodingEngine:
    """Takes requests, then fails in step() the way a device error would."""

    def __init__(self):
        self.requests = set()
        self.shut_down = False

    def get_tokenizer(self):
        return None

    def shutdown(self):
        self.shut_down = True

    def add_request(self, request_id, *args, **kwargs):
        self.requests.add(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        raise RuntimeError("device lost")

    def stats(self):
        from engine import EngineStats

        return EngineStats(0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0.0)


def test_engine_failure_fails_jobs_instead_of_hanging_them():
    from worker.engine_service import EngineFailure

    exploding = ExplodingEngine()
    engines = iter([exploding])  # the rebuild after the failure fails too
    service = EngineService(lambda: next(engines))
    service.start()
    with pytest.raises(EngineFailure, match="device lost"):
        service.submit("doomed", 1, [1, 2], params()).result(timeout=10)
    with pytest.raises(EngineFailure):
        service.submit("later", 1, [1, 2], params()).result(timeout=10)
    # The failed engine was shut down (a tensor-parallel one's ranks stopped) before the
    # rebuild was tried.
    assert exploding.shut_down
