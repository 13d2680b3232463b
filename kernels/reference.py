"""Plain-torch references of the kernels: KV cache, paged attention, mixture of experts,
quantized GEMMs.

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


def _gather_context(cache: Tensor, block_table: Tensor, first_block: int, seq_len: int) -> Tensor:
    """Tokens first_block * block_size .. seq_len-1 of one sequence, [n, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache[block_table[first_block:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[: seq_len - first_block * block_size]


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
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Causal attention of each sequence's new tokens over its paged context.

    The q_len new tokens of sequence i sit at positions seq_len-q_len .. seq_len-1;
    query head h reads KV head h // group (the grouping of `repeat_kv` in HF Llama).
    With a `window` w, the token at position p sees keys p-w+1 .. p, w of them with
    itself (Transformers' `sliding_window_overlay`: kv_idx > q_idx - w); blocks
    wholly left of every new token's window are never read (they may be freed).
    With a `softcap` c, scores (already scaled) become c * tanh(scores / c) before
    the mask and the softmax (Gemma 2's attn_logit_softcapping).
    `max_query_len` and `max_seq_len` are accepted for signature parity only.
    """
    num_heads, block_size = query.shape[1], k_cache.shape[1]
    group = num_heads // k_cache.shape[2]
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        lowest_key = 0 if window is None else max(0, seq_len - q_len - window + 1)
        first_block = lowest_key // block_size
        q = query[q_lo:q_hi].double()
        k = _gather_context(k_cache, block_tables[i], first_block, seq_len).double()
        v = _gather_context(v_cache, block_tables[i], first_block, seq_len).double()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(first_block * block_size, seq_len, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - window
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


def select_experts(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Each token's top_k experts and their weights: softmax over all experts in float32,
    the k largest, rescaled to sum to 1 if `renormalize` (Mixtral always; Qwen3-MoE as
    its `norm_topk_prob` says). Returns (weights [T, k] float32, ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(
    hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor
) -> Tensor:
    """out[t] = sum_j topk_weights[t, j] * (silu(gate) * up) @ w2[e].T with e = topk_ids[t, j],
    where [gate; up] = w13[e] @ hidden[t] (the first I rows of w13[e] are the gate's).
    Computed expert by expert in float64; returned in hidden's dtype."""
    inter_size = w2.shape[2]
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    for expert in range(w2.shape[0]):
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        x = hidden[tokens].double()
        gate = x @ w13[expert, :inter_size].double().T
        up = x @ w13[expert, inter_size:].double().T
        y = (torch.nn.functional.silu(gate) * up) @ w2[expert].double().T
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None].double())
    return out.to(hidden.dtype)


def int8_gemm(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x @ (weight * scale[:, None]).T for an int8 weight [N, K] and per-row scale [N],
    in float64; returned in x's dtype."""
    w = weight.double() * scale.double()[:, None]
    return (x.double() @ w.T).to(x.dtype)


def _unpack_int4(packed: Tensor, order: tuple[int, ...]) -> Tensor:
    """[R, C] int32 -> [R, 8 C]: the j-th 4-bit value of each int32 (bits 4j..4j+3)
    lands in column `order[j]` of its 8."""
    position = [order.index(c) for c in range(8)]
    shifts = torch.tensor(position, device=packed.device, dtype=torch.int32) * 4
    return ((packed[..., None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SEQUENTIAL = tuple(range(8))


def _ungroup(q: Tensor, z: Tensor, scales: Tensor, group_size: int,
             g_idx: Tensor | None) -> Tensor:
    """(q[k] - z[g]) * scales[g] in float32 for each input row k of q [K, N], g its group:
    g_idx[k], or k // group_size (then whole groups are views, not gathers)."""
    if g_idx is None and q.shape[0] % group_size == 0:
        rows = q.view(-1, group_size, q.shape[1])
        return ((rows - z[:, None]).float() * scales[:, None].float()).view(q.shape)
    groups = (torch.arange(q.shape[0], device=q.device) // group_size if g_idx is None
              else g_idx.long())
    return (q - z[groups]).float() * scales[groups].float()


def dequantize_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """W [K, N] float32 from AWQ's qweight [K, N / 8], qzeros [G, N / 8] (both packed
    along the outputs in the order 0, 2, 4, 6, 1, 3, 5, 7), scales [G, N]:
    W[k, n] = (q[k, n] - z[g, n]) * s[g, n] with g = k // group_size."""
    q = _unpack_int4(qweight, _AWQ_ORDER)
    return _ungroup(q, _unpack_int4(qzeros, _AWQ_ORDER), scales, group_size, None)


def dequantize_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int,
                    zero_offset: int = 1, g_idx: Tensor | None = None) -> Tensor:
    """W [K, N] float32 from GPTQ's qweight [K / 8, N] (8 consecutive inputs an int32),
    qzeros [G, N / 8] (8 consecutive outputs), scales [G, N]:
    W[k, n] = (q[k, n] - (z[g, n] + zero_offset)) * s[g, n] with g = g_idx[k] (act-order
    checkpoints) or k // group_size; the "gptq" format stores zero points minus one
    (zero_offset 1)."""
    q = _unpack_int4(qweight.T.contiguous(), _SEQUENTIAL).T
    z = _unpack_int4(qzeros, _SEQUENTIAL) + zero_offset
    return _ungroup(q, z, scales, group_size, g_idx)


def awq_gemm(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor,
             group_size: int) -> Tensor:
    """x @ W with W dequantized (`dequantize_awq`) and rounded to x's dtype, in float64."""
    w = dequantize_awq(qweight, qzeros, scales, group_size).to(x.dtype)
    return (x.double() @ w.double()).to(x.dtype)


def gptq_gemm(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int,
              zero_offset: int = 1, g_idx: Tensor | None = None) -> Tensor:
    """x @ W with W dequantized (`dequantize_gptq`) and rounded to x's dtype, in float64."""
    w = dequantize_gptq(qweight, qzeros, scales, group_size, zero_offset, g_idx).to(x.dtype)
    return (x.double() @ w.double()).to(x.dtype)
