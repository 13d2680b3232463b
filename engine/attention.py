"""Attention over the paged KV cache: batch metadata and the two backends.

The torch backend gathers each sequence's blocks and runs SDPA; decodes are
batched into one call, prefill chunks go one sequence at a time. The triton
backend calls the kernels in `kernels/`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


class TorchAttention:
    """Reference-quality attention in plain torch, used on the CPU."""

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, meta, scale)
        start = d
        for i in range(d, len(meta.seq_lens_cpu)):
            q_len, ctx = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            out[start:start + q_len] = self._prefill(
                q[start:start + q_len], k_cache, v_cache, meta.block_tables[i], ctx, scale
            )
            start += q_len
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, block_tables: torch.Tensor, ctx: int) -> torch.Tensor:
        """[..., num_blocks] block ids -> [..., num_kv_heads, ctx, head_dim] contiguous K or V."""
        blocks = cache[block_tables]                       # [..., nb, bs, kvh, d]
        *lead, nb, bs, kvh, hd = blocks.shape
        flat = blocks.reshape(*lead, nb * bs, kvh, hd)[..., :ctx, :, :]
        return flat.transpose(-3, -2)

    def _decode(self, q, k_cache, v_cache, meta, scale):
        d = meta.num_decodes
        ctx = max(meta.seq_lens_cpu[:d])
        nb = -(-ctx // k_cache.shape[1])
        tables = meta.block_tables[:d, :nb].long()
        k = self._gather(k_cache, tables, ctx)            # [d, kvh, ctx, hd]
        v = self._gather(v_cache, tables, ctx)
        positions = torch.arange(ctx, device=q.device)
        mask = positions[None, :] < meta.seq_lens[:d, None]  # [d, ctx]
        # Slots past a sequence's end were never written and may hold NaN, which a
        # mask cannot hide (NaN - inf and 0 * NaN are NaN): clear them.
        unwritten = ~mask[:, None, :, None]
        k = k.masked_fill(unwritten, 0.0)
        v = v.masked_fill(unwritten, 0.0)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
        )
        return out.squeeze(2)

    def _prefill(self, q, k_cache, v_cache, block_table, ctx, scale):
        q_len = q.shape[0]
        nb = -(-ctx // k_cache.shape[1])
        table = block_table[:nb].long()
        k = self._gather(k_cache, table, ctx)              # [kvh, ctx, hd]
        v = self._gather(v_cache, table, ctx)
        qt = q.transpose(0, 1)                             # [h, q_len, hd]
        if q_len == ctx:
            out = F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale,
                                                 enable_gqa=True)
        else:
            # New tokens sit at the end of the context: token i sees keys 0..ctx-q_len+i.
            rows = torch.arange(q_len, device=q.device)[:, None] + (ctx - q_len)
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows
            out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, scale=scale,
                                                 enable_gqa=True)
        return out.transpose(0, 1)


class TritonAttention:
    """The Triton paged-attention kernel: one launch for the whole mixed batch."""

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
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
