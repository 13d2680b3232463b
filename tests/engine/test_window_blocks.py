"""A model whose every layer attends within a sliding window frees the blocks behind it:
a long generation holds a bounded number of blocks, and the tokens do not change."""

from pathlib import Path

import pytest
import torch
import transformers as tf

from engine import LLM, SamplingParams
from engine.block_manager import FREED
from tests.engine.hf_reference import hf_greedy

WINDOW, BLOCK, LONG = 64, 16, 2000
# The window's tokens straddle at most WINDOW / BLOCK + 1 blocks.
BOUND = WINDOW // BLOCK + 1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = tf.MistralConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                              sliding_window=WINDOW, max_position_embeddings=4096,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0,
                              tie_word_embeddings=False, initializer_range=0.25)
    path = tmp_path_factory.mktemp("mistral-window")
    tf.MistralForCausalLM(config).save_pretrained(path)
    return path


def _generate(path: Path, prompt: list[int], n: int, free: bool
              ) -> tuple[list[list[int]], int]:
    """Greedy (n = 1) or seeded samples, stepped by hand; returns the outputs and the
    most device blocks in use after any step."""
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=BLOCK,
              num_device_blocks=512, swap_space_gib=0.01)
    engine = llm.engine
    assert engine.scheduler.bm.window == WINDOW
    if not free:
        engine.scheduler.bm.window = None
    params = SamplingParams(n=n, temperature=0 if n == 1 else 1.0, seed=5, max_tokens=LONG,
                            ignore_eos=True)
    engine.add_request("long", prompt, params)
    peak, final = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.finished else final
        stats = engine.stats()
        peak = max(peak, stats.device_blocks_total - stats.device_blocks_free)
        running = engine.scheduler.running
        for seq in running[0].seqs if free and running else ():
            assert sum(b != FREED for b in seq.block_table) <= BOUND
    assert final is not None
    return [list(o.token_ids) for o in final.outputs], peak


@pytest.mark.slow
def test_a_long_generation_holds_the_window_and_matches_transformers(mistral):
    prompt = [5 + i % 300 for i in range(20)]
    tokens, peak = _generate(mistral, prompt, n=1, free=True)
    assert peak <= BOUND
    unfreed, peak_unfreed = _generate(mistral, prompt, n=1, free=False)
    assert peak_unfreed >= (len(prompt) + LONG) // BLOCK  # without freeing: every block
    assert tokens == unfreed
    assert tokens == hf_greedy(mistral, [prompt], LONG, ignore_eos=True)


@pytest.mark.slow
def test_samples_sharing_a_prompt_each_hold_the_window(mistral):
    prompt = [7 + i % 200 for i in range(150)]  # longer than the window: freed at once
    tokens, peak = _generate(mistral, prompt, n=2, free=True)
    assert peak <= 2 * BOUND
    assert tokens == _generate(mistral, prompt, n=2, free=False)[0]
