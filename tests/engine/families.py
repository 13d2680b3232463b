"""Small random checkpoints of every supported family, built with Transformers' own config
classes: one definition for the parity tests (tests/engine/test_families.py) and the GPU
parity check (bench/gpu_parity.py).

Vocabulary 384, 2-4 layers, GQA 4:2, and a window of 48 tokens where the family has one.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf

VOCAB, WINDOW = 384, 48
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


def build(name: str, path: Path, device: torch.device | str = "cpu") -> Path:
    """Write family `name`'s random float32 checkpoint (seed 0) to `path`."""
    family = FAMILIES[name]
    config = family.config_cls(**{**COMMON, **family.fields}, initializer_range=family.std)
    torch.manual_seed(0)
    with torch.device(device):
        model = family.model_cls(config)
    model.save_pretrained(path)
    return path
