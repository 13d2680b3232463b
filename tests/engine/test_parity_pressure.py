"""Greedy parity with Transformers itself under pressure: tight pools that preempt by swap,
by recompute or both, max_num_seqs below the number of prompts, and chunked prefill.

The reference is Transformers' own greedy generate, one prompt at a time, not the engine
with a larger pool: a bug that changes outputs the same way in every pool size still fails.
"""

import random
from pathlib import Path

import pytest
import torch

from engine import LLM, RequestOutput, SamplingParams
from engine.cache_engine import CacheEngine
from tests.engine.hf_reference import hf_greedy

# The checkpoint's shape (make_checkpoint's defaults); the KV part sizes the CPU pool.
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 512
FIRST_TOKEN = 3  # prompts avoid the special ids 0-2 (EOS is 2)
PROMPT_LENGTHS = [5, 60, 17, 33, 8, 47, 24, 12, 55, 29]
MAX_TOKENS = 24
TIGHT_POOL_TOKENS = 160  # 2-3 of the 29-84-token sequences; the longest alone fits
AMPLE_POOL_TOKENS = 1024  # every sequence at once: never preempts
AMPLE_SWAP_TOKENS = 1024  # every sequence fits in the CPU pool at once
SHORT_SWAP_TOKENS = 48  # too small for some swaps: those preemptions recompute instead
MAX_NUM_SEQS = 3
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

MODES = {  # name: (preemption_mode, CPU pool tokens, swaps, recomputes)
    "swap": ("swap", AMPLE_SWAP_TOKENS, True, False),
    "recompute": ("recompute", 0, False, True),
    "mixed": ("swap", SHORT_SWAP_TOKENS, True, True),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(make_checkpoint) -> Path:
    return make_checkpoint(num_heads=4, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                           layers=LAYERS, vocab=VOCAB)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(12)
    return [[rng.randrange(FIRST_TOKEN, VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def expected(model_dir, prompts) -> list[list[int]]:
    """Transformers' greedy continuations, computed once for the module."""
    return hf_greedy(model_dir, prompts, MAX_TOKENS, ignore_eos=True)


def _llm(path: Path, block_size: int, pool_tokens: int, swap_tokens: int, mode: str,
         **overrides) -> LLM:
    """An LLM whose device and CPU pools hold exactly `pool_tokens` and `swap_tokens`."""
    block_bytes = CacheEngine.block_bytes(LAYERS, KV_HEADS, HEAD_DIM, block_size, torch.float32)
    device_blocks, swap_blocks = pool_tokens // block_size, swap_tokens // block_size
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=block_size,
              num_device_blocks=device_blocks, swap_space_gib=swap_blocks * block_bytes / 2**30,
              preemption_mode=mode, **overrides)
    stats = llm.engine.stats()
    assert (stats.device_blocks_total, stats.swap_blocks_total) == (device_blocks, swap_blocks)
    return llm


def _generate(llm: LLM, prompts: list[list[int]]) -> list[RequestOutput]:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.abort_reason is None for o in outs)
    assert {c.finish_reason for o in outs for c in o.outputs} == {"length"}
    return outs


def _assert_matches(outs: list[RequestOutput], expected: list[list[int]]) -> None:
    for i, (out, want) in enumerate(zip(outs, expected, strict=True)):
        assert [c.token_ids for c in out.outputs] == [want], f"prompt {i}"


def _assert_preempted(llm: LLM, outs: list[RequestOutput], swaps: bool,
                      recomputes: bool) -> None:
    """The pool really was tight, and preemption took the paths the mode asks for."""
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == stats.num_preemptions
    assert (stats.num_swapped_out_blocks > 0) == swaps
    assert (sum(o.metrics.num_recomputed_tokens for o in outs) > 0) == recomputes


def _assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.device_blocks_free == stats.device_blocks_total
    assert stats.swap_blocks_free == stats.swap_blocks_total
    assert (stats.num_running, stats.num_waiting, stats.num_swapped) == (0, 0, 0)
    assert stats.num_swapped_in_blocks == stats.num_swapped_out_blocks


def test_reference_runs_every_prompt_to_full_length(expected):
    """ignore_eos reached Transformers: no continuation stopped at EOS."""
    assert [len(e) for e in expected] == [MAX_TOKENS] * len(PROMPT_LENGTHS)


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_tight_pool_matches_transformers(model_dir, prompts, expected, mode, block_size):
    preemption_mode, swap_tokens, swaps, recomputes = MODES[mode]
    llm = _llm(model_dir, block_size, TIGHT_POOL_TOKENS, swap_tokens, preemption_mode)
    outs = _generate(llm, prompts)
    _assert_matches(outs, expected)
    _assert_preempted(llm, outs, swaps, recomputes)
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("mode", ["ample", *sorted(MODES)])
def test_max_num_seqs_below_prompts_matches_transformers(model_dir, prompts, expected, mode):
    """Three sequences at a time for ten prompts, alone and under a tight pool."""
    if mode == "ample":
        llm = _llm(model_dir, 8, AMPLE_POOL_TOKENS, 0, "swap", max_num_seqs=MAX_NUM_SEQS)
    else:
        preemption_mode, swap_tokens, swaps, recomputes = MODES[mode]
        # The three longest sequences need 30 blocks of 8: 16 is tight even for three.
        llm = _llm(model_dir, 8, 128, swap_tokens, preemption_mode, max_num_seqs=MAX_NUM_SEQS)
    outs = _generate(llm, prompts)
    _assert_matches(outs, expected)
    assert llm.engine.stats().peak_num_running == MAX_NUM_SEQS
    if mode == "ample":
        assert llm.engine.stats().num_preemptions == 0
    else:
        _assert_preempted(llm, outs, swaps, recomputes)
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chunked_prefill_under_a_tight_pool_matches_transformers(model_dir, prompts, expected,
                                                                  mode):
    """A 16-token step budget splits every prompt over 5+ tokens into chunks that share
    steps with decodes, while the pool preempts."""
    preemption_mode, swap_tokens, swaps, recomputes = MODES[mode]
    llm = _llm(model_dir, 8, TIGHT_POOL_TOKENS, swap_tokens, preemption_mode,
               max_num_batched_tokens=16)
    outs = _generate(llm, prompts)
    _assert_matches(outs, expected)
    _assert_preempted(llm, outs, swaps, recomputes)
    _assert_all_blocks_free(llm)
