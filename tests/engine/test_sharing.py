"""Shared copy-on-write blocks: n > 1 sampling, beam search, prefix caching."""

import random

import pytest
import torch

from engine import LLM, BeamSearchParams, LLMEngine, SamplingParams
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from tests.engine.test_engine import _drain, _engine


def _hf_beams(path, prompt_ids, k, max_tokens, length_penalty, early_stopping):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([prompt_ids])
    with torch.inference_mode():
        r = model.generate(x, attention_mask=torch.ones_like(x), num_beams=k,
                           num_return_sequences=k, do_sample=False, max_new_tokens=max_tokens,
                           length_penalty=length_penalty, early_stopping=early_stopping,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return r.sequences[:, len(prompt_ids):].tolist(), r.sequences_scores.tolist()


def _assert_same_beams(outputs, ref_seqs, ref_scores, pad_ids):
    assert len(outputs) == len(ref_seqs)
    for out, ref, score in zip(outputs, ref_seqs, ref_scores, strict=True):
        n = len(out.token_ids)
        # Transformers pads finished beams to the longest one.
        assert out.token_ids == ref[:n] and all(t in pad_ids for t in ref[n:])
        assert out.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize(("k", "length_penalty", "early_stopping", "prompt"), [
    (2, 0.5, True, "The capital of France is"),
    (4, 2.0, False, "Write a haiku about the sea."),
])
def test_beam_search_matches_transformers_on_smollm2(smollm2_dir, k, length_penalty,
                                                      early_stopping, prompt):
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", num_device_blocks=256,
              swap_space_gib=0.01)
    params = BeamSearchParams(beam_width=k, max_tokens=10, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    out = llm.beam_search([prompt], params)[0]
    ref = _hf_beams(smollm2_dir, llm.get_tokenizer().encode(prompt), k, 10, length_penalty,
                    early_stopping)
    _assert_same_beams(out.outputs, *ref, pad_ids={0, 2})
    stats = llm.engine.stats()
    assert stats.num_cow_copies > 0 and stats.device_blocks_free == stats.device_blocks_total


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(("length_penalty", "early_stopping"),
                         [(0.5, False), (1.0, True), (2.0, False)])
def test_beam_search_matches_transformers_on_random_llama(make_checkpoint, k, length_penalty,
                                                          early_stopping):
    path = make_checkpoint(num_heads=6, num_kv_heads=2)
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, num_device_blocks=128,
              swap_space_gib=0.01)
    rng = random.Random(k)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 8, 21)]
    params = BeamSearchParams(beam_width=k, max_tokens=16, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    # Beam requests batch continuously with an ordinary one.
    llm.engine.add_request("plain", prompts[0], SamplingParams(temperature=0, max_tokens=5))
    outs = llm.beam_search(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        _assert_same_beams(out.outputs, *_hf_beams(path, prompt, k, 16, length_penalty,
                                                   early_stopping), pad_ids={0, 2})


def test_n_samples_hold_the_prompt_blocks_once(tiny_llama_dir, monkeypatch):
    engine = _engine(tiny_llama_dir, block_size=16, num_device_blocks=64,
                     enable_prefix_caching=False)
    copies: list[tuple[int, int]] = []
    real_copy = engine.cache.copy
    monkeypatch.setattr(engine.cache, "copy", lambda pairs: (copies.extend(pairs),
                                                             real_copy(pairs)))
    prompt = list(range(1000, 1200))  # 12 full blocks of 16, 8 tokens in a 13th
    engine.add_request("n8", prompt, SamplingParams(n=8, temperature=1.0, seed=5, max_tokens=6,
                                                     ignore_eos=True))
    engine.step()  # prefill, fork into 8, first tokens
    partial = engine.requests["n8"].seqs[0].block_table[12]
    engine.step()  # each sample writes its first token into the shared partial block
    stats = engine.stats()
    used = stats.device_blocks_total - stats.device_blocks_free
    assert used == 12 + 8  # the full prompt blocks once, plus one partial block each
    assert stats.num_cow_copies == 7 and {src for src, _ in copies} == {partial}
    done = _drain(engine)
    assert len(done["n8"].outputs) == 8
    assert engine.stats().device_blocks_free == 64


def test_without_sharing_every_fork_copies_every_block(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, block_size=16, num_device_blocks=256,
                     enable_prefix_caching=False, share_blocks=False)
    engine.add_request("n8", list(range(1000, 1200)),
                       SamplingParams(n=8, temperature=1.0, seed=5, max_tokens=6,
                                      ignore_eos=True))
    engine.step()
    engine.step()
    stats = engine.stats()
    assert stats.device_blocks_total - stats.device_blocks_free == 8 * 13


def test_seeded_n_samples_are_batch_invariant(tiny_llama_dir):
    params = SamplingParams(n=4, temperature=0.8, seed=77, max_tokens=12, ignore_eos=True)
    prompt = "four samples from one prompt"
    alone_engine = _engine(tiny_llama_dir)
    alone_engine.add_request("r", prompt, params)
    alone = [o.token_ids for o in _drain(alone_engine)["r"].outputs]
    assert len({tuple(a) for a in alone}) > 1  # the samples differ from each other
    engine = _engine(tiny_llama_dir)
    for i in range(6):
        engine.add_request(f"o{i}", "noise " * (i + 1),
                           SamplingParams(temperature=1.0, max_tokens=8 + i, ignore_eos=True))
    engine.add_request("r", prompt, params)
    assert [o.token_ids for o in _drain(engine)["r"].outputs] == alone


def _shared_prefix_run(path, caching: bool):
    engine = _engine(path, block_size=16, num_device_blocks=256, enable_prefix_caching=caching)
    rng = random.Random(1)
    instruction = [rng.randrange(3, 49000) for _ in range(256)]
    for i in range(16):
        doc = [rng.randrange(3, 49000) for _ in range(rng.randint(5, 40))]
        engine.add_request(f"d{i}", instruction + doc,
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    done = _drain(engine)
    return engine.stats(), {k: v.outputs[0].token_ids for k, v in done.items()}, done


def test_prefix_caching_prefills_a_shared_instruction_once(tiny_llama_dir):
    cached_stats, cached, done = _shared_prefix_run(tiny_llama_dir, caching=True)
    plain_stats, plain, _ = _shared_prefix_run(tiny_llama_dir, caching=False)
    assert cached == plain
    saved = plain_stats.num_prompt_tokens - cached_stats.num_prompt_tokens
    assert saved == 15 * 256  # the instruction's 16 full blocks computed by the first only
    assert all(done[f"d{i}"].metrics.num_cached_tokens == 256 for i in range(1, 16))
    assert cached_stats.prefix_cache_hit_rate > 0.8
    assert cached_stats.device_blocks_free == cached_stats.device_blocks_total


def test_hash_collisions_never_share_a_wrong_block(tiny_llama_dir, monkeypatch):
    _, plain, _ = _shared_prefix_run(tiny_llama_dir, caching=False)
    monkeypatch.setattr(BlockManager, "hash_block", staticmethod(lambda parent, tokens: 1))
    _, collided, _ = _shared_prefix_run(tiny_llama_dir, caching=True)
    assert collided == plain


def test_bad_sharing_requests_get_clear_errors(tiny_llama_dir):
    with pytest.raises(ValueError, match="^beam_width "):
        BeamSearchParams(beam_width=0)
    with pytest.raises(ValueError, match="^n "):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="temperature is 0"):
        SamplingParams(n=2, temperature=0)
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu",
                                    block_size=16, num_device_blocks=8, swap_space_gib=0.01))
    engine.add_request("ok", "still served", SamplingParams(temperature=0, max_tokens=3))
    with pytest.raises(ValueError, match="beam_width 8 needs up to"):
        engine.add_request("huge", "too wide", BeamSearchParams(beam_width=8, max_tokens=64))
    assert len(_drain(engine)["ok"].outputs[0].token_ids) == 3
