"""The whole engine on the Triton kernels (interpreted on CPU) equals the torch backend
and Transformers, through prefill chunks, decodes and copy-on-write forks."""

import random

from engine import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy


def _generate(path, backend: str, prompts, params):
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=8, num_device_blocks=64,
              swap_space_gib=0.01, max_num_batched_tokens=32, attention_backend=backend)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_triton_backend_matches_torch_and_transformers(make_checkpoint):
    path = make_checkpoint(num_heads=6, num_kv_heads=2)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 9, 40)]
    greedy = SamplingParams(temperature=0, max_tokens=6)
    triton = _generate(path, "triton", prompts, greedy)
    assert triton == _generate(path, "torch", prompts, greedy)
    assert [t[0] for t in triton] == hf_greedy(path, prompts, 6)
    # Forked samples exercise copy_blocks on the shared partial block.
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4)
    assert _generate(path, "triton", prompts[1:2], sampled) == _generate(
        path, "torch", prompts[1:2], sampled)
