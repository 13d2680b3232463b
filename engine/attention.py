"""What every attention backend shares: the step's metadata and the backend contract.

Imports no backend: `engine.torch_attention` and `engine.triton_attention` implement
the contract, and `engine.attention_factory` picks one.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to.

    Sequences are ordered decodes first (`num_decodes` of them, one token each),
    then prefill chunks.
    """

    slot_mapping: torch.Tensor      # [num_tokens] int64
    block_tables: torch.Tensor      # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor          # [num_seqs] int32, context after this step
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int
    num_decodes: int
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]


class AttentionBackend(ABC):
    """Attention over the paged KV cache, and the block moves in that cache.

    One object serves every layer; the caches are per layer [num_blocks,
    block_size, num_kv_heads, head_dim], the pools [num_layers, 2, num_blocks, ...].
    """

    # Whether a decode step can be replayed from a CUDA graph: `prepare` and
    # `attend` then launch work of fixed shapes that reads only device tensors.
    supports_cuda_graphs: bool = False

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> None:
        """Build this step's plan from `meta`, once per forward, before any layer attends."""

    @abstractmethod
    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                 v_scale: float = 1.0) -> None:
        """Write the step's k/v [num_tokens, num_kv_heads, head_dim] into their slots.

        A float8 cache (kv_cache_dtype "fp8") holds k / k_scale and v / v_scale, the
        layer's per-tensor scales; a cache of the model's dtype ignores them."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, window: int | None = None,
               softcap: float | None = None, k_scale: float = 1.0,
               v_scale: float = 1.0) -> torch.Tensor:
        """One layer's attention output [num_tokens, num_heads, head_dim], read from the
        cache after `store_kv`, by the plan of the last `prepare`; changes no cache.

        `window` w (the layer's sliding window; None for a global layer): the token at
        position p sees keys p-w+1 .. p, itself and the w-1 before it, as Transformers'
        sliding-window mask does (kv_idx > q_idx - w); blocks wholly left of every new
        token's window are never read, so the engine may free them. `softcap` c:
        scaled scores s become c * tanh(s / c) before the mask and softmax (Gemma 2).
        Both are fixed per layer, which keeps a captured CUDA graph valid, as are
        `k_scale` and `v_scale`, by which a float8 cache's entries are multiplied back."""

    @abstractmethod
    def copy_blocks(self, kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
        """Copy blocks inside one pool, every layer, K and V; pairs is [n, 2] (src, dst)."""

    @abstractmethod
    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: torch.Tensor) -> None:
        """Move blocks between the device pool and the CPU pool; pairs is [n, 2] (src, dst)."""
