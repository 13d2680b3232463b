"""Qwen3: Llama with an RMSNorm per head on q and k, and its mixture-of-experts sibling
Qwen3-MoE (experts on every `decoder_sparse_step`-th layer outside `mlp_only_layers`)."""

from dataclasses import replace

from transformers import PretrainedConfig

from engine.models.causal_lm import CausalLM, base_spec, layer_window
from engine.models.layers import LayerSpec


class Qwen3ForCausalLM(CausalLM):
    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        return replace(base_spec(config, layer_window(config, index)), qk_norm=True)


class Qwen3MoeForCausalLM(CausalLM):
    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        # No layer_types here: a window (set only with use_sliding_window) covers every layer.
        spec = replace(base_spec(config, config.sliding_window), qk_norm=True)
        sparse = (index not in config.mlp_only_layers and config.num_experts > 0
                  and (index + 1) % config.decoder_sparse_step == 0)
        if not sparse:
            return spec
        return replace(spec, intermediate_size=config.moe_intermediate_size,
                       num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                       renormalize=config.norm_topk_prob)
