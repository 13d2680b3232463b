"""Gemma 2 and Gemma 3 (text): norms before and after attention and MLP, all scaling
by (1 + w); embeddings scaled by √hidden; GELU-tanh; queries scaled by
query_pre_attn_scalar; sliding-window and global layers as `layer_types` says.
Gemma 2 soft-caps attention and final logits; Gemma 3 adds q/k norms and gives its
sliding layers their own RoPE base."""

from dataclasses import replace

from transformers import PretrainedConfig

from engine.models.causal_lm import CausalLM, base_spec, layer_window
from engine.models.layers import LayerSpec
from engine.models.rotary import RotaryEmbedding


class Gemma2ForCausalLM(CausalLM):
    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        return replace(base_spec(config, layer_window(config, index)),
                       activation=config.hidden_activation,
                       scale=config.query_pre_attn_scalar**-0.5,
                       softcap=config.attn_logit_softcapping,
                       sandwich_norms=True, unit_offset_norms=True)

    @classmethod
    def embedding_scale(cls, config: PretrainedConfig) -> float | None:
        return config.hidden_size**0.5

    @classmethod
    def final_softcap(cls, config: PretrainedConfig) -> float | None:
        return config.final_logit_softcapping


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        return replace(super().layer_spec(config, index), qk_norm=True,
                       rope=config.layer_types[index])

    def rotary_tables(self) -> dict[str, RotaryEmbedding]:
        return {kind: RotaryEmbedding(self.config, self.head_dim, self.max_len, kind)
                for kind in set(self.config.layer_types)}
