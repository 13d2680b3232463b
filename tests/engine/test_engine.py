"""LLMEngine behaviour on a tiny random checkpoint: continuous batching, seeds, bad input."""

import json
import random

import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.config import EngineConfig


def _engine(path, **kwargs) -> LLMEngine:
    defaults = dict(dtype="float32", device="cpu", num_device_blocks=256, swap_space_gib=0.01)
    return LLMEngine(EngineConfig(model=str(path), **{**defaults, **kwargs}))


def _drain(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _alone(path, prompt, params):
    engine = _engine(path)
    engine.add_request("alone", prompt, params)
    return _drain(engine)["alone"].outputs[0].token_ids


def test_request_joins_running_batch_at_next_step(tiny_llama_dir):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine = _engine(tiny_llama_dir)
    engine.add_request("a", "The first request", greedy)
    engine.add_request("b", "and the second one", greedy)
    for _ in range(5):
        engine.step()
    engine.add_request("late", "A request arriving while others decode", greedy)
    outs = {o.request_id: o for o in engine.step()}
    assert set(outs) == {"a", "b", "late"}  # prefilled and sampled in the very next step
    assert len(outs["late"].outputs[0].token_ids) == 1
    assert len(outs["a"].outputs[0].token_ids) == 6
    done = _drain(engine)
    assert done["late"].outputs[0].token_ids == _alone(
        tiny_llama_dir, "A request arriving while others decode", greedy)


def test_finished_request_leaves_at_once(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    engine.add_request("short", "short one", SamplingParams(temperature=0, max_tokens=3,
                                                             ignore_eos=True))
    engine.add_request("long", "long one", SamplingParams(temperature=0, max_tokens=30,
                                                           ignore_eos=True))
    for _ in range(2):
        engine.step()
    free_before = engine.stats().device_blocks_free
    outs = {o.request_id: o for o in engine.step()}
    assert outs["short"].finished and outs["short"].outputs[0].finish_reason == "length"
    stats = engine.stats()
    assert stats.num_running == 1 and stats.device_blocks_free > free_before
    assert {o.request_id for o in engine.step()} == {"long"}


def test_seeded_request_is_batch_invariant(tiny_llama_dir):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16,
                            ignore_eos=True)
    prompt = "Seeded sampling should not depend on the batch"
    alone = _alone(tiny_llama_dir, prompt, params)
    engine = _engine(tiny_llama_dir)
    rng = random.Random(0)
    for i in range(15):
        engine.add_request(f"other{i}", " ".join(["word"] * rng.randint(1, 40)),
                           SamplingParams(temperature=rng.choice([0, 0.7, 1.2]),
                                          max_tokens=rng.randint(4, 24), ignore_eos=True))
    engine.add_request("seeded", prompt, params)
    assert _drain(engine)["seeded"].outputs[0].token_ids == alone


def test_stop_strings_and_token_ids(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", num_device_blocks=64,
              swap_space_gib=0.01)
    free = llm.generate("Count with me", SamplingParams(temperature=0, max_tokens=12,
                                                         ignore_eos=True), use_tqdm=False)[0]
    ids, text = free.outputs[0].token_ids, free.outputs[0].text
    out = llm.generate("Count with me", SamplingParams(temperature=0, max_tokens=12,
                                                        stop_token_ids=[ids[3]], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:ids.index(ids[3]) + 1] and out.finish_reason == "stop"
    stop = text[len(text) // 2:][:3]
    out = llm.generate("Count with me", SamplingParams(temperature=0, max_tokens=12, stop=[stop],
                                                        ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.outputs[0].text == text[:text.index(stop)]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "prompt is empty"), ([], "prompt is empty"), ("word " * 300, "max_model_len"),
     ([1, 2, 10**9], "token ids must be in"), (3.5, "must be a str or a list")],
)
def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(tiny_llama_dir, prompt, message):
    engine = _engine(tiny_llama_dir, max_model_len=256)
    engine.add_request("good", "fine prompt", SamplingParams(temperature=0, max_tokens=4))
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, SamplingParams(temperature=0))
    done = _drain(engine)
    assert list(done) == ["good"] and len(done["good"].outputs[0].token_ids) == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
     ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"min_p": 2.0}, "min_p"), ({"n": 0}, "n"),
     ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty")],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_str_prompt_without_tokenizer_is_rejected(make_checkpoint):
    engine = _engine(make_checkpoint(num_heads=4, num_kv_heads=4))
    with pytest.raises(ValueError, match="has no tokenizer"):
        engine.add_request("r", "text", SamplingParams())
    engine.add_request("ids", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2))
    assert len(_drain(engine)["ids"].outputs[0].token_ids) == 2


def test_unknown_model_and_unsupported_architecture(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in model"):
        LLM(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(tmp_path), device="cpu")


def test_unwritten_cache_slots_are_never_read(tiny_llama_dir):
    """A pool full of NaN gives the same tokens: only written slots reach the output."""
    prompts = ["a short one", "a somewhat longer prompt than the first", "x"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    clean = _engine(tiny_llama_dir, block_size=8)
    poisoned = _engine(tiny_llama_dir, block_size=8)
    poisoned.cache.device_cache.fill_(float("nan"))
    for engine in (clean, poisoned):
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
    want = {k: v.outputs[0].token_ids for k, v in _drain(clean).items()}
    assert {k: v.outputs[0].token_ids for k, v in _drain(poisoned).items()} == want
