"""Attention over the paged KV cache: the step's metadata, the Triton backend (the
kernels in `kernels/`), the cache writes, and the choice of backend. The torch
backend lives in `engine/torch_attention.py`."""

from dataclasses import dataclass

import torch

from engine.torch_attention import DecodeGroup, TorchAttention


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
    decode_groups: list[DecodeGroup] | None = None   # the torch backend's, made once


class TritonAttention:
    """The Triton paged-attention kernel: one launch for the whole mixed batch."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
        from kernels import paged_attention

        # The step's k and v were stored first: the kernel reads them from the cache.
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                               meta.query_start_loc, meta.max_query_len, meta.max_seq_len, scale)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str) -> None:
    if backend == "triton":
        from kernels import store_kv as triton_store_kv

        triton_store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def make_attention(backend: str) -> TorchAttention | TritonAttention:
    return TritonAttention() if backend == "triton" else TorchAttention()
