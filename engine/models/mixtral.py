"""Mixtral: Mistral with a top-k mixture of experts in place of the MLP, routing
weights renormalised over the chosen experts; its checkpoint names the experts'
projections w1 (gate), w3 (up) and w2 (down) under block_sparse_moe."""

from dataclasses import replace

from transformers import PretrainedConfig

from engine.models.causal_lm import CausalLM, base_spec
from engine.models.layers import LayerSpec


class MixtralForCausalLM(CausalLM):
    renames = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."),
               (".w3.", ".up_proj."), (".w2.", ".down_proj."))

    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        spec = base_spec(config, window=getattr(config, "sliding_window", None))
        return replace(spec, num_experts=config.num_local_experts,
                       top_k=config.num_experts_per_tok, renormalize=True)
