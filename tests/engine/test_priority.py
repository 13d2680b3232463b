"""Priority that makes room: a more important request preempts less important running
ones, comes back from the swap pool first, is not held back by swapped ones, and a
request that waits long enough moves up so that it cannot starve."""

import time

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INTERACTIVE, BULK = 0, 1
LONG = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _engine(path, **overrides) -> LLMEngine:
    config = dict(model=str(path), dtype="float32", device="cpu", block_size=8,
                  num_device_blocks=256, max_num_seqs=4, max_model_len=128)
    return LLMEngine(EngineConfig(**(config | overrides)))


def _prompt(i: int, n: int = 20) -> list[int]:
    return [3 + (i * 7 + j) % 500 for j in range(n)]


def _running(engine: LLMEngine) -> set[str]:
    return {g.request_id for g in engine.scheduler.running}


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def test_interactive_preempts_a_bulk_flood(make_checkpoint):
    """Every slot holds a bulk request; an interactive one starts within two steps and
    finishes while bulk requests still run; every output is what it is without it."""
    path = make_checkpoint(num_heads=4, num_kv_heads=2)
    calm = _engine(path, max_num_seqs=8)
    for i in range(4):
        calm.add_request(f"bulk{i}", _prompt(i), LONG, priority=BULK)
    calm.add_request("chat", _prompt(9), SHORT, priority=INTERACTIVE)
    expected = _drain(calm)

    engine = _engine(path)
    for i in range(4):
        engine.add_request(f"bulk{i}", _prompt(i), LONG, priority=BULK)
    for _ in range(3):
        engine.step()
    assert _running(engine) == {f"bulk{i}" for i in range(4)}
    engine.add_request("chat", _prompt(9), SHORT, priority=INTERACTIVE)
    finished: dict[str, list[int]] = {}
    for step in range(1, 10):
        finished |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
        if step <= 2 and "chat" in _running(engine):
            started = step
        if "chat" in finished:
            break
    assert started <= 2
    assert "chat" in finished and not any(r.startswith("bulk") for r in finished)
    assert engine.stats().num_preemptions >= 1
    finished |= _drain(engine)
    assert finished == expected
    assert engine.block_manager.device.num_free == engine.block_manager.device.num_blocks


def test_swapped_bulk_does_not_hold_back_interactive(make_checkpoint):
    """A pool too small for the flood swaps bulk requests out; an interactive request
    that arrives then is admitted ahead of them, not after they all came back."""
    path = make_checkpoint(num_heads=4, num_kv_heads=2)
    engine = _engine(path, num_device_blocks=24, swap_space_gib=1 / 1024)
    for i in range(4):
        engine.add_request(f"bulk{i}", _prompt(i, 40), LONG, priority=BULK)
    while not engine.scheduler.swapped:
        engine.step()
    engine.add_request("chat", _prompt(9), SHORT, priority=INTERACTIVE)
    for _ in range(2):
        engine.step()
        if "chat" in _running(engine):
            break
    assert "chat" in _running(engine)
    assert engine.scheduler.swapped, "the interactive request waited for every swapped one"
    done = _drain(engine)
    assert set(done) == {"chat", *(f"bulk{i}" for i in range(4))}


def test_a_waiting_bulk_request_ages_past_a_stream_of_interactive_ones(make_checkpoint):
    """One slot, a steady stream of interactive requests: without aging the bulk one
    never starts while the stream lasts; with aging it does, and finishes."""
    path = make_checkpoint(num_heads=4, num_kv_heads=2)

    def bulk_started_under_stream(aging_s: float | None) -> bool:
        engine = _engine(path, max_num_seqs=1, priority_aging_s=aging_s)
        engine.add_request("chat0", _prompt(0), SHORT, priority=INTERACTIVE)
        engine.step()
        engine.add_request("bulk", _prompt(1), SHORT, priority=BULK)
        deadline = time.monotonic() + 3.0
        i = 1
        while time.monotonic() < deadline:
            if len(engine.scheduler.waiting) < 2:  # the stream never runs dry
                engine.add_request(f"chat{i}", _prompt(i + 1), SHORT, priority=INTERACTIVE)
                i += 1
            outs = engine.step()
            if any(o.request_id == "bulk" and o.finished for o in outs):
                return True
        return False

    assert not bulk_started_under_stream(None)
    assert bulk_started_under_stream(0.5)


def test_aging_setting_is_checked():
    with pytest.raises(ValueError, match="priority_aging_s"):
        EngineConfig(priority_aging_s=0)
