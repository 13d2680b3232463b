"""Attention over the paged KV cache: batch metadata and the two backends.

The torch backend gathers each sequence's K/V slots and runs SDPA; decodes are
batched into one call, prefill chunks go one sequence at a time. The triton
backend calls the kernels in `kernels/`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class DecodeIndex:
    """The slots the batched decodes read, built once per step for every layer."""

    slots: torch.Tensor   # [num_decodes, max_ctx] int64; past a sequence's end: its last slot
    mask: torch.Tensor    # [num_decodes, 1, 1, max_ctx] bool, True where the slot is its own


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
    decode_index: DecodeIndex | None = None   # the torch backend's, made on first use


class TorchAttention:
    """Reference-quality attention in plain torch, used on the CPU.

    Every SDPA call is 4-D: on the CPU, 3-D inputs fall back to the unfused math
    kernel, several times slower than the flash kernel.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
        d = meta.num_decodes
        if d == len(meta.seq_lens_cpu):
            return self._decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, meta, scale)
        start = d
        for i in range(d, len(meta.seq_lens_cpu)):
            q_len, ctx = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            rows = slice(start, start + q_len)
            if q_len == ctx:  # a whole prompt: its K/V are this step's own
                out[rows] = self._attend(q[rows], k[rows], v[rows], scale)
            else:
                table = meta.block_tables[i, :-(-ctx // k_cache.shape[1])].long()
                out[rows] = self._attend(q[rows], self._gather(k_cache, table, ctx),
                                         self._gather(v_cache, table, ctx), scale)
            start += q_len
        return out

    @staticmethod
    def _decode_index(meta: AttentionMetadata, block_size: int) -> DecodeIndex:
        d = meta.num_decodes
        ctx = max(meta.seq_lens_cpu[:d])
        positions = torch.arange(ctx, device=meta.seq_lens.device).expand(d, ctx)
        last = meta.seq_lens[:d, None].long() - 1
        mask = positions <= last
        # Padding reads the sequence's own last slot rather than a never-written one,
        # which may hold anything (NaN included, and 0 * NaN is NaN even when masked).
        positions = torch.minimum(positions, last)
        blocks = meta.block_tables[:d].long().gather(1, positions // block_size)
        slots = blocks * block_size + positions % block_size
        return DecodeIndex(slots.flatten(), mask[:, None, None, :])

    def _decode(self, q, k_cache, v_cache, meta, scale):
        if meta.decode_index is None:
            meta.decode_index = self._decode_index(meta, k_cache.shape[1])
        index = meta.decode_index
        d, _, kvh, hd = q.shape[0], *k_cache.shape[1:]
        k = k_cache.flatten(0, 1).index_select(0, index.slots).view(d, -1, kvh, hd)
        v = v_cache.flatten(0, 1).index_select(0, index.slots).view(d, -1, kvh, hd)
        # One query token per sequence: the heads sharing a KV head become its rows.
        out = F.scaled_dot_product_attention(
            q.view(d, kvh, -1, hd), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=index.mask, scale=scale)
        return out.reshape(q.shape)

    @staticmethod
    def _gather(cache: torch.Tensor, block_table: torch.Tensor, ctx: int) -> torch.Tensor:
        """A sequence's block ids -> its [ctx, num_kv_heads, head_dim] K or V."""
        return cache.index_select(0, block_table).flatten(0, 1)[:ctx]

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                ) -> torch.Tensor:
        """One sequence's new tokens [q_len, h, hd], which end its context k/v [ctx, kvh, hd]."""
        q_len, ctx = q.shape[0], k.shape[0]
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        if q_len == ctx:
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale,
                                                 enable_gqa=True)
        else:
            # Token i sees keys 0..ctx-q_len+i.
            rows = torch.arange(q_len, device=q.device)[:, None] + (ctx - q_len)
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale,
                                                 enable_gqa=True)
        return out[0].transpose(0, 1)


class TritonAttention:
    """The Triton paged-attention kernel: one launch for the whole mixed batch."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
        from kernels import paged_attention

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
