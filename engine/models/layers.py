"""The building blocks every family shares, and one decoder layer parameterised by
what the families differ in (`LayerSpec`).

Inputs are flat: all scheduled tokens of all sequences in one [num_tokens] batch,
with `positions` and the attention metadata telling them apart. q/k/v and gate/up
projections are fused into one matmul each.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.distributed.shard import Shard
from engine.models.moe import SparseMoE
from engine.models.rotary import apply_rotary
from engine.models.tp_rules import column_parallel, row_parallel

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One decoder layer's shape and the switches the families set."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    scale: float
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False              # Qwen3, Gemma 3: RMSNorm per head on q and k
    window: int | None = None          # sliding window in tokens, None for global
    softcap: float | None = None       # Gemma 2: attention logits soft-capped
    rope: str = "global"               # which of the model's rotary tables
    sandwich_norms: bool = False       # Gemma: norms after attention and MLP as well
    unit_offset_norms: bool = False    # Gemma: RMSNorm scales by (1 + w)
    num_experts: int = 0               # > 0: a mixture of experts instead of the MLP
    top_k: int = 0
    renormalize: bool = False          # rescale the top-k routing weights to sum to 1


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like Transformers, so half-precision runs match it; Llama
        # scales after casting back, Gemma scales by (1 + w) before.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """This rank's heads (all of them on one rank): q/k/v column-parallel, o_proj
    row-parallel with one all-reduce after it."""

    def __init__(self, spec: LayerSpec, backend: AttentionBackend, shard: Shard) -> None:
        super().__init__()
        q_heads, kv_heads = shard.heads(spec.num_heads, spec.num_kv_heads)
        self.num_heads = len(q_heads)
        self.num_kv_heads = len(kv_heads)
        self.head_dim = d = spec.head_dim
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.qkv_proj = nn.Linear(spec.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=spec.o_bias)
        if shard.size > 1:
            rows = (_rows(q_heads, d), _rows(kv_heads, d), _rows(kv_heads, d))
            sizes = (spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d)
            column_parallel(self.qkv_proj, list(zip(sizes, rows, strict=True)))
            row_parallel(self.o_proj, _rows(q_heads, d), shard.rank)
        self.shard = shard
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.eps, spec.unit_offset_norms)
            self.k_norm = RMSNorm(spec.head_dim, spec.eps, spec.unit_offset_norms)
        self.qk_norm = spec.qk_norm
        self.scale = spec.scale
        self.window = spec.window
        self.softcap = spec.softcap
        self.backend = backend  # shared by every layer: it holds the step's plan
        # Per-tensor scales of a float8 KV cache: stored entries are k / k_scale.
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: Rope) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k heads side by side: one rotary pass rotates both.
        qk = qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                     self.head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :self.num_heads]),
                            self.k_norm(qk[:, self.num_heads:])), dim=1)
        qk = apply_rotary(qk, *rope)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping,
                              self.k_scale, self.v_scale)
        o = self.backend.attend(q, k, v, self.k_cache, self.v_cache, meta, self.scale,
                                window=self.window, softcap=self.softcap,
                                k_scale=self.k_scale, v_scale=self.v_scale)
        return self.shard.all_reduce(self.o_proj(o.reshape(-1, self.q_size)))


def _rows(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


class GatedMLP(nn.Module):
    """This rank's columns of the intermediate size: gate/up column-parallel, down_proj
    row-parallel with one all-reduce after it."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str,
                 shard: Shard) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {activation!r}; pagedq supports "
                             f"{', '.join(ACTIVATIONS)}")
        part = shard.part(intermediate_size)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * len(part), bias=False)
        self.down_proj = nn.Linear(len(part), hidden_size, bias=False)
        if shard.size > 1:
            column_parallel(self.gate_up_proj, [(intermediate_size, part)] * 2)
            row_parallel(self.down_proj, part, shard.rank)
        self.act = ACTIVATIONS[activation]
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.shard.all_reduce(self.down_proj(self.act(gate) * up))


class DecoderLayer(nn.Module):
    """Attention then MLP (or experts), each behind a residual; the norm names are the
    checkpoints': Llama's post_attention_layernorm feeds the MLP, Gemma's (sandwich
    norms) normalises the attention output and pre/post_feedforward_layernorm wrap the MLP."""

    def __init__(self, spec: LayerSpec, backend: AttentionBackend, shard: Shard) -> None:
        super().__init__()
        norm = partial(RMSNorm, spec.hidden_size, spec.eps, spec.unit_offset_norms)
        self.self_attn = Attention(spec, backend, shard)
        if spec.num_experts:
            self.mlp = SparseMoE(spec.hidden_size, spec.intermediate_size, spec.num_experts,
                                 spec.top_k, spec.renormalize, shard)
        else:
            self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.activation,
                                shard)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich_norms = spec.sandwich_norms
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.rope = spec.rope

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                ropes: dict[str, Rope]) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), meta, ropes[self.rope])
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))
