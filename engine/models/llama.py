"""Llama and the families that differ from it only in bias and window: Mistral (one
sliding window for every layer) and Qwen2 (q/k/v bias, windows per `layer_types`)."""

from dataclasses import replace

from transformers import PretrainedConfig

from engine.models.causal_lm import CausalLM, base_spec, layer_window
from engine.models.layers import LayerSpec


class LlamaForCausalLM(CausalLM):
    """The base decoder exactly: every layer global, no bias."""


class MistralForCausalLM(CausalLM):
    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        return base_spec(config, window=getattr(config, "sliding_window", None))


class Qwen2ForCausalLM(CausalLM):
    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        return replace(base_spec(config, layer_window(config, index)), qkv_bias=True,
                       o_bias=False)
