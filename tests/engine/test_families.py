"""Every supported family is token-exact against Transformers' greedy generate in float32.

Each checkpoint is random and small (vocabulary 384, 2-4 layers, GQA 4:2), built with
Transformers' own config class and written with save_pretrained, with a window of 48
tokens where the family has one: prompts of 1 to 300 tokens run past it. Every
family runs with block sizes 8 and 16, with chunked prefill, and preempted by swap and
by recompute.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf

from engine import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy

VOCAB, WINDOW, MAX_TOKENS = 384, 48, 24
PROMPT_LENGTHS = (1, 7, 47, 48, 49, 100, 300)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _longrope(original: int) -> dict:
    """Phi-4-mini's shape of `longrope`: partial rotary (12 of 16 dims), 6 factors a set."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.1 * i for i in range(6)],
            "long_factor": [1.0 + 0.7 * i for i in range(6)]}


@dataclass(frozen=True)
class Family:
    config_cls: type
    model_cls: type
    fields: dict            # config fields beyond (or replacing) COMMON's
    std: float = 0.25       # of the random weights: large, for clear next-token margins
    prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS


FAMILIES = {
    "llama": Family(tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_hidden_layers=2)),
    "mistral": Family(tf.MistralConfig, tf.MistralForCausalLM,
                      dict(num_hidden_layers=2, sliding_window=WINDOW)),
    # The layers from max_window_layers on slide: one global, one windowed.
    "qwen2": Family(tf.Qwen2Config, tf.Qwen2ForCausalLM,
                    dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW,
                         max_window_layers=1)),
    # head_dim 32 is not hidden / heads: read from the config, as Qwen3 checkpoints need.
    "qwen3": Family(tf.Qwen3Config, tf.Qwen3ForCausalLM,
                    dict(num_hidden_layers=2, head_dim=32, use_sliding_window=True,
                         sliding_window=WINDOW, max_window_layers=1)),
    # max_model_len (max_position_embeddings) is within original_max_position_embeddings:
    # the short factors, as Transformers takes them for sequences that short.
    "phi3": Family(tf.Phi3Config, tf.Phi3ForCausalLM,
                   dict(num_hidden_layers=2, sliding_window=WINDOW, max_position_embeddings=512,
                        original_max_position_embeddings=512, rope_parameters=_longrope(512))),
    # max_model_len outgrows original_max_position_embeddings (64): the long factors, as
    # Transformers takes them once a sequence is longer than 64; every prompt here is.
    "phi3-long": Family(tf.Phi3Config, tf.Phi3ForCausalLM,
                        dict(num_hidden_layers=2, sliding_window=WINDOW,
                             original_max_position_embeddings=64,
                             rope_parameters=_longrope(64)),
                        prompt_lengths=(65, 66, 100, 150, 300)),
    # Soft-caps low enough to bend the scores, and smaller weights so they rarely saturate.
    "gemma2": Family(tf.Gemma2Config, tf.Gemma2ForCausalLM,
                     dict(num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
                          query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                          final_logit_softcapping=8.0, hidden_activation="gelu_pytorch_tanh"),
                     std=0.1),
    # Local and global layers alternate, each kind with its own RoPE base.
    "gemma3": Family(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                     dict(num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
                          sliding_window_pattern=2, query_pre_attn_scalar=24,
                          rope_parameters={
                              "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                          }),
                     std=0.1),
    "mixtral": Family(tf.MixtralConfig, tf.MixtralForCausalLM,
                      dict(num_hidden_layers=2, sliding_window=WINDOW, num_local_experts=4,
                           num_experts_per_tok=2)),
    # Layer 0 keeps a dense MLP; the top-2 of 8 experts are not renormalised.
    "qwen3-moe": Family(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                        dict(num_hidden_layers=2, head_dim=16, num_experts=8,
                             num_experts_per_tok=2, moe_intermediate_size=32,
                             norm_topk_prob=False, mlp_only_layers=[0], use_sliding_window=True,
                             sliding_window=WINDOW, max_window_layers=0)),
}

# The families whose every layer is windowed: their blocks behind the window can go.
ALL_WINDOWED = {"mistral", "phi3", "phi3-long", "mixtral", "qwen3-moe"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Path, list[list[int]], list[list[int]]]:
    """(checkpoint, prompts, Transformers' greedy continuations) of one family."""
    name = request.param
    fam = FAMILIES[name]
    torch.manual_seed(0)
    model = fam.model_cls(fam.config_cls(**{**COMMON, **fam.fields}, initializer_range=fam.std))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    rng = random.Random(name)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in fam.prompt_lengths]
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
