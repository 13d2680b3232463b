"""Greedy output is token-identical to Transformers' generate in float32."""

import random

import pytest

from engine import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "Explain what a hash table is to a ten-year-old.",
    "def fibonacci(n):",
    "Translate to French: The cat sleeps on the warm windowsill.",
    "List three uses of copper.",
    "Once upon a time, in a village at the edge of a great forest, there lived an old "
    "clockmaker who had never once left the valley. Every morning he",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The quick brown fox",
    "Summarise: Paged attention stores the key-value cache in fixed-size blocks, so memory "
    "is allocated on demand and shared between sequences that have a common prefix.",
    "Why is the sky blue?",
]


def _engine_greedy(path, prompts, max_tokens, **kwargs):
    llm = LLM(str(path), dtype="float32", device="cpu", swap_space_gib=0.01, **kwargs)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.device_blocks_free == stats.device_blocks_total  # no leak
    return [o.outputs[0].token_ids for o in outs]


def test_smollm2_batch_matches_transformers(smollm2_dir):
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", num_device_blocks=256,
              swap_space_gib=0.01)
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode(p) for p in SMOLLM2_PROMPTS]
    assert len({len(p) for p in prompt_ids}) >= 8  # varied lengths
    outs = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    assert llm.engine.stats().peak_num_running == len(prompt_ids)  # all in one batch
    ref = hf_greedy(smollm2_dir, prompt_ids, 48)
    for got, want in zip(outs, ref, strict=True):
        assert got.outputs[0].token_ids == want


@pytest.mark.parametrize(
    ("arch", "num_heads", "num_kv_heads", "block_size"),
    [
        ("llama", 4, 4, 8),     # GQA group 1
        ("llama", 6, 2, 16),    # group 3, like SmolLM2
        ("llama", 8, 2, 32),    # group 4
        ("qwen2", 4, 4, 16),    # q/k/v bias
        ("qwen2", 6, 2, 8),
        ("qwen2", 8, 2, 32),
    ],
)
def test_random_checkpoints_match_transformers(make_checkpoint, arch, num_heads, num_kv_heads,
                                               block_size):
    path = make_checkpoint(arch=arch, num_heads=num_heads, num_kv_heads=num_kv_heads)
    rng = random.Random(block_size * num_heads)
    # Lengths around block boundaries and beyond several blocks.
    lengths = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 70]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    got = _engine_greedy(path, prompts, 24, block_size=block_size, num_device_blocks=128)
    assert got == hf_greedy(path, prompts, 24)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ],
)
def test_rope_scaling_matches_transformers(make_checkpoint, rope):
    path = make_checkpoint(num_heads=4, num_kv_heads=2, rope=rope)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 90)]
    assert _engine_greedy(path, prompts, 32, num_device_blocks=64) == hf_greedy(path, prompts, 32)


def test_chunked_prefill_mixed_with_decode_matches(make_checkpoint):
    """A token budget smaller than the prompts forces chunks that share steps with decodes."""
    path = make_checkpoint(num_heads=6, num_kv_heads=2)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 100, 41, 7, 130)]
    got = _engine_greedy(path, prompts, 20, block_size=16, num_device_blocks=128,
                         max_num_batched_tokens=24)
    assert got == hf_greedy(path, prompts, 20)
