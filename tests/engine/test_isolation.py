"""The engine rejects what it cannot run, and a request that fails inside a step is
aborted alone: its neighbours get exactly the tokens they get without it."""

import math
import random

import pytest
import torch

from engine import LLM, BeamSearchParams, LLMEngine, SamplingParams, detokenizer
from engine.beam_search import BeamState
from engine.config import EngineConfig
from engine.step_isolation import bisect_failures

MARKER = 450  # a token id only the poisoned prompts hold (neighbours use ids below 400)


def _engine(path, **kwargs) -> LLMEngine:
    defaults = dict(dtype="float32", device="cpu", num_device_blocks=256, swap_space_gib=0.01)
    return LLMEngine(EngineConfig(model=str(path), **{**defaults, **kwargs}))


def _drain(engine: LLMEngine, max_steps: int = 500) -> dict:
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    raise AssertionError(f"the engine still runs {list(engine.requests)} after {max_steps}")


def _tokens(out) -> list[list[int]]:
    return [o.token_ids for o in out.outputs]


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(length)]


def _neighbours() -> dict:
    """Healthy requests of every kind: greedy, seeded, n=2 seeded samples, beam search."""
    return {
        "greedy": (_prompt(1, 9), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
        "seeded": (_prompt(2, 14), SamplingParams(temperature=0.9, top_p=0.9, seed=42,
                                                  max_tokens=12, ignore_eos=True)),
        "n2": (_prompt(3, 6), SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=10,
                                             ignore_eos=True)),
        "beam": (_prompt(4, 11), BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True)),
    }


def _reference(path, requests: dict, **config) -> dict:
    engine = _engine(path, **config)
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return {k: _tokens(v) for k, v in _drain(engine).items()}


def _assert_all_blocks_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.device_blocks_free == stats.device_blocks_total
    assert stats.swap_blocks_free == stats.swap_blocks_total
    assert not engine.has_unfinished_requests()


def _poison_forward(engine: LLMEngine) -> None:
    """The model raises on any batch holding MARKER late in a prompt (position >= 60)."""
    model = engine.runner.model
    real = model.forward

    def forward(input_ids, positions, meta):
        if ((input_ids == MARKER) & (positions >= 60)).any():
            raise RuntimeError("poisoned forward")
        return real(input_ids, positions, meta)

    model.forward = forward


# ---- rejected up front ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
     ({"temperature": "0.5"}, "temperature"), ({"top_p": math.nan}, "top_p"),
     ({"min_p": math.inf}, "min_p"), ({"repetition_penalty": math.inf}, "repetition_penalty"),
     ({"presence_penalty": math.nan}, "presence_penalty"),
     ({"frequency_penalty": -math.inf}, "frequency_penalty"),
     ({"temperature": True}, "temperature"), ({"top_p": 10**400}, "top_p"),
     ({"n": True}, "n"), ({"n": 2.0}, "n"), ({"top_k": 1.5}, "top_k"),
     ({"max_tokens": True}, "max_tokens"), ({"min_tokens": "1"}, "min_tokens"),
     ({"logprobs": 21}, "logprobs"), ({"logprobs": 10**6}, "logprobs"),
     ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"),
     ({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"seed": 1.0}, "seed"),
     ({"seed": True}, "seed"), ({"stop_token_ids": [True]}, "stop_token_ids"),
     ({"stop_token_ids": 5}, "stop_token_ids"), ({"stop": 5}, "stop"),
     ({"ignore_eos": 1}, "ignore_eos")],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"beam_width": 2.0}, "beam_width"), ({"beam_width": True}, "beam_width"),
     ({"max_tokens": True}, "max_tokens"), ({"length_penalty": math.inf}, "length_penalty"),
     ({"length_penalty": math.nan}, "length_penalty"),
     ({"stop_token_ids": [-1]}, "stop_token_ids")],
)
def test_invalid_beam_search_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        BeamSearchParams(**{"beam_width": 2, **kwargs})


def test_the_bounds_themselves_are_accepted():
    for seed in (-2**63, 2**64 - 1):
        assert SamplingParams(seed=seed).seed == seed
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(logprobs=20, temperature=0, stop=("a", "b")).stop == ["a", "b"]


def test_seeds_wrap_around_like_torch_generators(tiny_llama_dir):
    """Sample 1 of seed 2**64 - 1 draws with seed 0, as sample 0 of seed 0 does."""
    engine = _engine(tiny_llama_dir)
    prompt = _prompt(5, 10)
    engine.add_request("top", prompt, SamplingParams(n=2, temperature=1.0, seed=2**64 - 1,
                                                     max_tokens=8, ignore_eos=True))
    engine.add_request("zero", prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=8,
                                                      ignore_eos=True))
    done = _drain(engine)
    assert done["top"].outputs[1].token_ids == done["zero"].outputs[0].token_ids
    assert done["top"].outputs[0].token_ids != done["top"].outputs[1].token_ids


@pytest.mark.parametrize(
    ("request_id", "params", "kwargs", "message"),
    [("bad", SamplingParams(stop_token_ids=[10**9], min_tokens=2), {}, "^stop_token_ids "),
     ("bad", SamplingParams(temperature=0, stop_token_ids=[49152]), {}, "^stop_token_ids "),
     ("bad", SamplingParams(n=10000), {}, "^n "),
     ("bad", SamplingParams(n=9), {}, "^n "),  # max_num_seqs is 8 here
     ("bad", BeamSearchParams(beam_width=9), {}, "^beam_width "),
     ("bad", "greedy", {}, "^params "),
     ("bad", SamplingParams(), {"priority": "high"}, "^priority "),
     ("bad", SamplingParams(), {"priority": True}, "^priority "),
     ("bad", SamplingParams(), {"deadline": math.nan}, "^deadline "),
     (7, SamplingParams(), {}, "^request_id "),
     ("good", SamplingParams(), {}, "^request_id 'good' is already in use")],
)
def test_requests_the_model_cannot_run_are_rejected_and_change_nothing(
        tiny_llama_dir, request_id, params, kwargs, message):
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = _reference(tiny_llama_dir, {"good": (_prompt(6, 12), greedy)}, max_num_seqs=8)
    engine = _engine(tiny_llama_dir, max_num_seqs=8)
    assert engine.hf_config.vocab_size == 49152
    engine.add_request("good", _prompt(6, 12), greedy)
    engine.step()
    before = engine.stats()
    with pytest.raises(ValueError, match=message):
        engine.add_request(request_id, _prompt(7, 5), params, **kwargs)
    assert engine.stats() == before and list(engine.requests) == ["good"]
    assert {k: _tokens(v) for k, v in _drain(engine).items()} == want
    _assert_all_blocks_free(engine)


def test_add_requests_adds_all_or_none(tiny_llama_dir):
    sampled = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)  # unseeded
    fresh = _engine(tiny_llama_dir)
    fresh.add_requests([("u", _prompt(8, 7), sampled, 0)])
    want = _tokens(_drain(fresh)["u"])
    engine = _engine(tiny_llama_dir)
    with pytest.raises(ValueError, match="^prompt is empty"):
        engine.add_requests([("a", _prompt(9, 5), sampled, 0), ("b", [], sampled, 0)])
    with pytest.raises(ValueError, match="^request_id 'a' appears twice"):
        engine.add_requests([("a", _prompt(9, 5), sampled, 0), ("a", _prompt(9, 6), None, 0)])
    with pytest.raises(ValueError, match="^n "):
        engine.add_requests([("a", _prompt(9, 5), None, 0),
                             ("b", _prompt(9, 5), SamplingParams(n=10**6), 1)])
    assert not engine.has_unfinished_requests() and engine.stats().num_waiting == 0
    # No seed was drawn by the failed calls: the unseeded request samples as in a fresh engine.
    engine.add_requests([("u", _prompt(8, 7), sampled, 0)])
    assert _tokens(_drain(engine)["u"]) == want


def test_generate_with_one_bad_prompt_leaves_nothing_behind(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", num_device_blocks=64,
              swap_space_gib=0.01)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with pytest.raises(ValueError, match="^prompt is empty"):
        llm.generate(["ok", ""], greedy, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    _assert_all_blocks_free(llm.engine)
    first = llm.generate(["ok"], greedy, use_tqdm=False)[0]
    again = llm.generate(["ok"], greedy, use_tqdm=False)[0]
    assert len(first.outputs[0].token_ids) == 5
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


# ---- isolated inside a step --------------------------------------------------------------


def test_requests_failing_in_the_sampler_are_aborted_alone(tiny_llama_dir):
    neighbours = _neighbours()
    want = _reference(tiny_llama_dir, neighbours)
    engine = _engine(tiny_llama_dir)
    index_error = SamplingParams(temperature=0, min_tokens=6, max_tokens=12)
    topk_error = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)
    engine.add_request("poison-a", _prompt(10, 8), index_error)
    for request_id, (prompt, params) in neighbours.items():
        engine.add_request(request_id, prompt, params)
    engine.add_request("poison-b", _prompt(11, 8), topk_error)
    for _ in range(2):
        assert not any(out.finished for out in engine.step())
    # Past validation, as in the reported bug: both raise inside the sampler next step.
    index_error.stop_token_ids = [10**9]
    topk_error.logprobs = 10**6
    done = _drain(engine)
    for request_id, error in (("poison-a", "IndexError"), ("poison-b", "RuntimeError")):
        out = done[request_id]
        assert out.outputs[0].finish_reason == "abort"
        assert out.abort_reason.startswith(f"engine error: {error}(")
        assert len(out.outputs[0].token_ids) == 2  # what it had before it failed
    assert {k: _tokens(done[k]) for k in neighbours} == want
    _assert_all_blocks_free(engine)


def test_a_request_failing_in_the_forward_is_aborted_alone(tiny_llama_dir):
    neighbours = _neighbours()
    config = dict(max_num_batched_tokens=48)  # the long poisoned prompt prefills in chunks
    want = _reference(tiny_llama_dir, neighbours, **config)
    engine = _engine(tiny_llama_dir, **config)
    _poison_forward(engine)
    poisoned = _prompt(12, 100)
    poisoned[90] = MARKER
    for request_id, (prompt, params) in neighbours.items():
        engine.add_request(request_id, prompt, params)
    engine.add_request("poison", poisoned, SamplingParams(temperature=0, max_tokens=4))
    done: dict = {}
    greedy_tokens_at_abort = None
    while engine.has_unfinished_requests():
        outs = {out.request_id: out for out in engine.step()}
        if "poison" in outs:
            greedy_tokens_at_abort = len(outs["greedy"].outputs[0].token_ids)
        done.update({k: v for k, v in outs.items() if v.finished})
    assert 0 < greedy_tokens_at_abort < 12  # it failed while the neighbours were decoding
    assert done["poison"].outputs[0].finish_reason == "abort"
    assert done["poison"].abort_reason == "engine error: RuntimeError('poisoned forward')"
    assert {k: _tokens(done[k]) for k in neighbours} == want
    _assert_all_blocks_free(engine)


def test_a_forward_that_fails_for_every_request_raises(tiny_llama_dir):
    """A broken model or device is not the requests' fault: step() raises instead of
    aborting every request as if each were a poison."""
    engine = _engine(tiny_llama_dir)

    def broken(*args):
        raise RuntimeError("device")

    engine.runner.model.forward = broken
    for i in range(3):
        engine.add_request(f"r{i}", _prompt(20 + i, 10), SamplingParams(temperature=0))
    with pytest.raises(RuntimeError, match="device"):
        engine.step()


def test_blocks_a_failed_forward_never_wrote_are_not_reused(tiny_llama_dir):
    """A request admitted in the same step reuses the failed one's prompt blocks from the
    prefix cache; it must compute them itself, and so must any later request."""
    shared = _prompt(13, 64)  # four full blocks of 16
    reader = shared + _prompt(14, 6)
    later = shared + _prompt(15, 3)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = {k: _reference(tiny_llama_dir, {k: (p, greedy)})[k]
            for k, p in (("reader", reader), ("later", later))}
    engine = _engine(tiny_llama_dir)
    engine.cache.device_cache.fill_(float("nan"))  # never-written slots poison what reads them
    _poison_forward(engine)
    engine.add_request("poison", [*shared, MARKER, *_prompt(16, 5)], greedy)
    engine.add_request("reader", reader, greedy)
    done = _drain(engine)
    assert done["poison"].outputs[0].finish_reason == "abort"
    assert _tokens(done["reader"]) == want["reader"]
    engine.add_request("later", later, greedy)
    assert _tokens(_drain(engine)["later"]) == want["later"]
    _assert_all_blocks_free(engine)


def test_a_request_failing_while_its_token_is_applied_is_aborted_alone(tiny_llama_dir,
                                                                       monkeypatch):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    healthy = {"a": ("The first request", greedy),
               "b": ("A second one", SamplingParams(temperature=0.8, seed=9, max_tokens=10,
                                                    ignore_eos=True, stop=["zzzz"]))}
    want = _reference(tiny_llama_dir, healthy)
    real = detokenizer.find_stop

    def find_stop(seq, new_text, stops):
        if "POISON" in stops:
            raise KeyError("stop matcher broke")
        return real(seq, new_text, stops)

    monkeypatch.setattr(detokenizer, "find_stop", find_stop)
    engine = _engine(tiny_llama_dir)
    engine.add_request("a", *healthy["a"])
    engine.add_request("poison", "Some prompt", SamplingParams(temperature=0, stop=["POISON"]))
    engine.add_request("b", *healthy["b"])
    done = _drain(engine)
    assert done["poison"].abort_reason == "engine error: KeyError('stop matcher broke')"
    assert {k: _tokens(done[k]) for k in healthy} == want
    _assert_all_blocks_free(engine)


def test_a_request_that_can_never_be_scheduled_is_aborted_not_looped_on(tiny_llama_dir):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = _reference(tiny_llama_dir, {"ok": (_prompt(17, 9), greedy)},
                      max_num_batched_tokens=8)
    engine = _engine(tiny_llama_dir, max_num_batched_tokens=8)
    wide = SamplingParams(n=2, temperature=1.0, max_tokens=4, ignore_eos=True)
    engine.add_request("stuck", _prompt(18, 5), wide)
    engine.add_request("ok", _prompt(17, 9), greedy)
    wide.n = 50  # past validation: 50 samples never fit a step of 8 tokens
    done = _drain(engine)
    assert done["stuck"].outputs[0].finish_reason == "abort"
    assert done["stuck"].abort_reason.startswith("the scheduler cannot fit this request")
    assert _tokens(done["ok"]) == want["ok"]
    _assert_all_blocks_free(engine)


# ---- the pieces ---------------------------------------------------------------------------


def test_bisection_pins_each_failure_on_one_item_and_keeps_order():
    calls: list[list[int]] = []

    def attempt(part: list[int]) -> list[int]:
        calls.append(part)
        if {3, 7} & set(part):
            raise ValueError(f"bad {sorted({3, 7} & set(part))}")
        return part

    items = list(range(10))
    try:
        attempt(items)
    except ValueError as exc:
        results, failed = bisect_failures(items, attempt, exc)
    assert [i for part in results for i in part] == [0, 1, 2, 4, 5, 6, 8, 9]
    assert [(item, str(exc)) for item, exc in failed] == [(3, "bad [3]"), (7, "bad [7]")]
    ran = [i for part in calls for i in part if not {3, 7} & set(part)]
    assert ran == sorted(ran)  # healthy parts run in the original order


def test_a_beam_step_changes_nothing_until_applied():
    state = BeamState(BeamSearchParams(beam_width=2, max_tokens=4), stop_token_ids={0})
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5], [0.1, 2.5, 2.0, 1.0]])
    args = (logits, [-0.5, -1.0], [[2], [3]], False)
    first = state.step(*args)
    assert state.finished == [] and not state.done and state.improvement_possible
    assert state.step(*args) == first
    assert first.finished  # token 0 (a stop) was among the best candidates
    state.apply(first)
    assert state.finished == first.finished
