"""Plain-torch references of the KV-cache kernels.

They are written for clarity, not speed (per-sequence loops, float64 maths) and
define what the Triton kernels must compute; the kernel tests compare against
them. Signatures match the kernels in `kernels/__init__.py` exactly.
"""

import torch
from torch import Tensor


def store_kv(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> None:
    """Write token i's K/V into slot `slot_mapping[i]`; slot -1 is padding and skipped."""
    block_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        k_cache[block, offset] = key[token]
        v_cache[block, offset] = value[token]


def _gather_context(cache: Tensor, block_table: Tensor, seq_len: int) -> Tensor:
    """The first `seq_len` tokens of one sequence as [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(
    query: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """Causal attention of each sequence's new tokens over its paged context.

    The q_len new tokens of sequence i sit at positions seq_len-q_len .. seq_len-1;
    query head h reads KV head h // group (the grouping of `repeat_kv` in HF Llama).
    `max_query_len` and `max_seq_len` are accepted for signature parity only.
    """
    num_heads = query.shape[1]
    group = num_heads // k_cache.shape[2]
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        q = query[q_lo:q_hi].double()
        k = _gather_context(k_cache, block_tables[i], seq_len).double()
        v = _gather_context(v_cache, block_tables[i], seq_len).double()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


def copy_blocks(kv_cache: Tensor, block_mapping: Tensor) -> None:
    """Copy block src -> dst in every layer, K and V ([num_layers, 2, num_blocks, ...])."""
    for src, dst in block_mapping.tolist():
        kv_cache[:, :, dst] = kv_cache[:, :, src]


def swap_blocks(src_cache: Tensor, dst_cache: Tensor, block_mapping: Tensor) -> None:
    """Copy block src of `src_cache` to block dst of `dst_cache`, all layers, K and V."""
    for src, dst in block_mapping.tolist():
        dst_cache[:, :, dst] = src_cache[:, :, src].to(dst_cache.device)
