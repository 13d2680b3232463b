"""Phi-3 and Phi-4-mini: Llama with q/k/v and gate/up already fused in the checkpoint
(loaded as they are), one sliding window when the config sets it, and RoPE that may
be partial and `longrope`-scaled (handled by `RotaryEmbedding`)."""

from transformers import PretrainedConfig

from engine.models.causal_lm import CausalLM, base_spec
from engine.models.layers import LayerSpec


class Phi3ForCausalLM(CausalLM):
    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        return base_spec(config, window=getattr(config, "sliding_window", None))
