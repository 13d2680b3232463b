"""Attention over the paged KV cache with the Triton kernels of `kernels/`: the CUDA backend.

`kernels` resolves each kernel on first use, so importing this module needs no
Triton; only a backend that runs does.
"""

import torch

import kernels
from engine.attention import AttentionBackend, AttentionMetadata


class TritonBackend(AttentionBackend):
    """One kernel launch attends the whole mixed batch of decodes and prefill chunks."""

    supports_cuda_graphs = True

    def prepare(self, meta: AttentionMetadata) -> None:
        """Nothing to plan: the kernel reads the metadata's device tensors as they are,
        which is also what lets a CUDA graph replay it with new contents."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                 v_scale: float = 1.0) -> None:
        kernels.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, window: int | None = None,
               softcap: float | None = None, k_scale: float = 1.0,
               v_scale: float = 1.0) -> torch.Tensor:
        # The step's k and v were stored first: the kernel reads them from the cache.
        # window, softcap and the KV scales are the layer's constants: under a CUDA graph
        # they are captured as the launch's scalar arguments and compiled variant, as
        # scale is.
        return kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, meta.max_query_len,
                                       meta.max_seq_len, scale, window=window,
                                       softcap=softcap, k_scale=k_scale, v_scale=v_scale)

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
        kernels.copy_blocks(kv_cache, pairs)

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: torch.Tensor) -> None:
        kernels.swap_blocks(src_cache, dst_cache, pairs)
