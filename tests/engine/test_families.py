"""Every supported family is token-exact against Transformers' greedy generate in float32.

Each checkpoint is random and small (vocabulary 384, 2-4 layers, GQA 4:2), built with
Transformers' own config class and written with save_pretrained, with a window of 48
tokens where the family has one: prompts of 1 to 300 tokens run past it. Every
family runs with block sizes 8 and 16, with chunked prefill, and preempted by swap and
by recompute.
"""

import random
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from tests.engine.families import ALL_WINDOWED, FAMILIES, VOCAB, WINDOW, build
from tests.engine.hf_reference import hf_greedy

MAX_TOKENS = 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Path, list[list[int]], list[list[int]]]:
    """(checkpoint, prompts, Transformers' greedy continuations) of one family."""
    name = request.param
    path = build(name, tmp_path_factory.mktemp(name))
    rng = random.Random(name)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)]
               for n in FAMILIES[name].prompt_lengths]
    return path, prompts, hf_greedy(path, prompts, MAX_TOKENS)


def _engine(path: Path, prompts: list[list[int]], **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), dtype="float32", device="cpu", swap_space_gib=0.01, **kwargs)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.device_blocks_free == stats.device_blocks_total  # no leak
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize(("block_size", "budget"), [(16, None), (8, 32)])
def test_family_matches_transformers(family, block_size, budget):
    """All prompts in one batch; with a 32-token step budget, prompts are prefilled in
    chunks that share steps with decodes."""
    path, prompts, expected = family
    extra = {} if budget is None else {"max_num_batched_tokens": budget}
    got, _ = _engine(path, prompts, block_size=block_size, num_device_blocks=256, **extra)
    assert got == expected


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_family_preempted_matches_transformers(family, mode, request):
    """A pool of 56 blocks of 8 holds the 300-token prompt and little else; a model whose
    every layer is windowed frees the blocks behind the window, and needs a pool of 16
    (the window's 6 blocks and a 64-token chunk's 8, and 2 more) to run short of room."""
    path, prompts, expected = family
    windowed = request.node.callspec.params["family"] in ALL_WINDOWED
    got, llm = _engine(path, prompts, block_size=8, num_device_blocks=16 if windowed else 56,
                       preemption_mode=mode, max_num_batched_tokens=64)
    assert got == expected
    assert llm.engine.stats().num_preemptions > 0


@pytest.mark.slow  # ~40 s on the interpreter; the kernels' own tests cover windows, caps, MoE
@pytest.mark.parametrize("family", ["gemma2", "mixtral"], indirect=True)
def test_triton_backend_matches_transformers(family):
    """The Triton kernels (under the interpreter on the CPU) with windowed, soft-capped
    layers mixed with global ones (Gemma 2), and beside experts (Mixtral)."""
    path, prompts, expected = family
    got, _ = _engine(path, prompts, block_size=16, num_device_blocks=256,
                     attention_backend="triton", max_num_batched_tokens=128)
    assert got == expected


def test_shared_window_only_when_every_layer_slides(family, request):
    path, _, _ = family
    name = request.node.callspec.params["family"]
    llm = LLM(str(path), dtype="float32", device="cpu", swap_space_gib=0.01,
              num_device_blocks=64)
    assert llm.engine.runner.model.shared_window == (WINDOW if name in ALL_WINDOWED else None)
