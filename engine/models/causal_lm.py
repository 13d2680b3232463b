"""A decoder-only language model over the paged KV cache, generic over the families.

A family subclasses `CausalLM` and states only what differs: `layer_spec` (built on
`base_spec`, Llama's reading of the config), the embedding scale, the final-logit
soft-cap, the rotary tables it needs and its checkpoint's weight-name renames.
"""

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.attention import AttentionBackend, AttentionMetadata
from engine.distributed.shard import ONE_RANK, Shard
from engine.models.layers import DecoderLayer, LayerSpec, RMSNorm
from engine.models.rotary import RotaryEmbedding
from engine.models.weights import WeightLoader


def base_spec(config: PretrainedConfig, window: int | None = None) -> LayerSpec:
    """A layer as Llama reads its config; families replace the fields they change."""
    head_dim = (getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    bias = bool(getattr(config, "attention_bias", False))
    return LayerSpec(
        hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size, eps=config.rms_norm_eps,
        scale=head_dim**-0.5, activation=getattr(config, "hidden_act", "silu"),
        qkv_bias=bias, o_bias=bias, window=window,
    )


def layer_window(config: PretrainedConfig, index: int) -> int | None:
    """The window of a model that names each layer's kind in `layer_types`."""
    kinds = getattr(config, "layer_types", None)
    if kinds and kinds[index] == "sliding_attention":
        return config.sliding_window
    return None


class CausalLM(nn.Module):
    # Checkpoint substring -> model substring, applied to every tensor name.
    renames: tuple[tuple[str, str], ...] = ()

    @classmethod
    def layer_spec(cls, config: PretrainedConfig, index: int) -> LayerSpec:
        return base_spec(config)

    @classmethod
    def embedding_scale(cls, config: PretrainedConfig) -> float | None:
        return None

    @classmethod
    def final_softcap(cls, config: PretrainedConfig) -> float | None:
        return None

    def rotary_tables(self) -> dict[str, RotaryEmbedding]:
        """The model's cos/sin tables, named as the layer specs' `rope` names them."""
        return {"global": RotaryEmbedding(self.config, self.head_dim, self.max_len)}

    def __init__(self, config: PretrainedConfig, max_len: int, backend: AttentionBackend,
                 shard: Shard = ONE_RANK) -> None:
        super().__init__()
        self.config = config
        self.max_len = max_len
        self.shard = shard
        specs = [self.layer_spec(config, i) for i in range(config.num_hidden_layers)]
        self.head_dim = specs[0].head_dim
        # Vocabulary-parallel: each rank embeds, and scores, its rows of the vocabulary.
        self.vocab = shard.vocab(config.vocab_size)
        rows = shard.vocab_rows(config.vocab_size)
        self.embed_tokens = nn.Embedding(rows, config.hidden_size)
        self.embed_scale = self.embedding_scale(config)
        self.layers = nn.ModuleList(DecoderLayer(spec, backend, shard) for spec in specs)
        self.num_kv_heads = self.layers[0].self_attn.num_kv_heads
        # The final norm is of the layers' kind: (1 + w) in Gemma.
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, specs[0].unit_offset_norms)
        self.logit_softcap = self.final_softcap(config)
        self.build_rotary(torch.device("cpu"))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, rows, bias=False)
        if shard.size > 1:
            for weight in (self.embed_tokens.weight, self.lm_head.weight):
                weight.tp_pieces = [(config.vocab_size, self.vocab)]
                weight.tp_rows = rows
        self.tie_weights()

    @property
    def shared_window(self) -> int | None:
        """The window every layer attends within, or None if any layer is global: only
        then may the blocks behind it be freed (Mistral yes, Gemma's mix of kinds no)."""
        windows = {layer.self_attn.window for layer in self.layers}
        return windows.pop() if len(windows) == 1 else None

    def build_rotary(self, device: torch.device) -> None:
        """(Re)build the cos/sin tables in float32, as Transformers does: a model built on
        the meta device has empty ones."""
        self.rotary = nn.ModuleDict(self.rotary_tables()).to(device)

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.embed_scale is not None:
            # Gemma rounds √hidden to the weights' dtype first, and so must we.
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        ropes = {name: table(positions, x.dtype) for name, table in self.rotary.items()}
        for layer in self.layers:
            x = layer(x, meta, ropes)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return self.embed_tokens(input_ids)
        # Tokens of other ranks' rows embed as zeros here; the all-reduce fills them in.
        local = input_ids - self.vocab.start
        mine = (local >= 0) & (local < len(self.vocab))
        x = self.embed_tokens(torch.where(mine, local, 0)) * mine.unsqueeze(-1)
        return self.shard.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        if self.shard.size > 1:
            logits = self.shard.gather_last(logits)[:, :self.config.vocab_size]
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], this
        rank's KV heads."""
        for layer, cache in zip(self.layers, kv_cache, strict=True):
            layer.self_attn.k_cache, layer.self_attn.v_cache = cache[0], cache[1]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = {"lm_head.weight"} if self.tie_word_embeddings else set()
        WeightLoader(self, self.renames, tied).load(weights)
