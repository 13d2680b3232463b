"""Causal attention over a paged KV cache, for prefill chunks, decode and mixed batches.

One kernel serves every batch. A program takes one KV head and a "query block":
up to BLOCK_Q consecutive new tokens of one sequence times the GROUP query heads
that share that KV head, packed into the BLOCK_M rows of one matrix so that
tl.dot runs on tensor cores even for a single decode token (GQA packing, as in
vLLM's unified attention). It walks the keys in TILE_N-token tiles, looking each
token's physical block up in the block table, with an online softmax in float32.

Decode batches (every sequence fits one query block) can be short of programs to
fill the GPU while each program walks a long context. Then every sequence's key
range is cut into NUM_SPLITS parts that run in parallel and write partial results
with their log-sum-exp; a second kernel merges them (flash-decoding).

A sliding window w lets the token at position p see keys p-w+1 .. p (Transformers'
`sliding_window_overlay`). A program then starts its walk at the KV block holding
the lowest key its first token sees: blocks wholly left of the window are neither
read nor looked up (the engine may have freed them), and the rest of the window is
masked inside the tiles. A soft-cap c turns scaled scores s into c * tanh(s / c)
before the mask (Gemma 2).

A float8 cache (kv_cache_dtype "fp8") holds K / k_scale and V / v_scale: tiles are
converted on load to the query's dtype for tl.dot, k_scale joins the softmax scale
and v_scale multiplies the output, so the kernel reads half the bytes of bf16.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.attention_plan import max_keys, plan

_LOG2E = 1.4426950408889634
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# triton.jit reads this at import, as we do: the interpreter's tl.dot multiplies
# bfloat16 operands as their raw 16-bit patterns, so there they go in as float32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning global query block `q_block` (sequence i's blocks start
    at query_start_loc[i] // BLOCK_Q + i), by binary search."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attention_kernel(
    out_ptr,
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    v_scale,
    softcap_log2,
    window,
    num_seqs,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    ONE_BLOCK_PER_SEQ: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    FP8_KV: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_BLOCK_PER_SEQ:
        seq = tl.program_id(0)
        q_block = 0
    else:
        seq = _find_seq(query_start_loc_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
        q_block = tl.program_id(0) - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row r holds new token q_block * BLOCK_Q + r // GROUP and query head
    # kv_head * GROUP + r % GROUP; rows past the block or the sequence are padding.
    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows // GROUP < BLOCK_Q) & (tok < q_len)
    pos = context_len + tok
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM

    q_rows = (q_start + tok) * stride_q_tok + head * stride_q_head
    q = tl.load(
        query_ptr + q_rows[:, None] + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    # Keys this block can see end after its last token and, under a window, start
    # in the KV block of its first token's lowest key. This split takes an even
    # share of their tiles (a share may be empty: it then stores an empty result).
    num_keys = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    if HAS_WINDOW:
        lowest_key = tl.maximum(context_len + q_block * BLOCK_Q - window + 1, 0)
        first_key = lowest_key // BLOCK_SIZE * BLOCK_SIZE
    else:
        first_key = 0
    num_tiles = tl.cdiv(num_keys - first_key, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    # A finite floor for the running max keeps fully masked rows free of inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_head_ptr = k_cache_ptr + kv_head * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head * stride_v_head
    cols = tl.arange(0, TILE_N)
    for tile in range(tile_lo, tile_hi):
        key_pos = first_key + tile * TILE_N + cols
        key_ok = key_pos < num_keys
        # Unused block-table entries may hold anything: never read them.
        block = tl.load(table_ptr + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slot = key_pos % BLOCK_SIZE
        k_offs = block * stride_k_blk + slot * stride_k_slot
        v_offs = block * stride_v_blk + slot * stride_v_slot
        # K comes in transposed, [BLOCK_D, TILE_N], ready for q @ k.
        k = tl.load(
            k_head_ptr + k_offs[None, :] + dims[:, None],
            mask=key_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_head_ptr + v_offs[:, None] + dims[None, :],
            mask=key_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP:
            # s is 2 * scores / c in base 2, so this is c * tanh(scores / c) in base 2.
            s = softcap_log2 * (1.0 - 2.0 / (tl.exp2(s) + 1.0))
        visible = row_ok[:, None] & (key_pos[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (key_pos[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION
        )
        m_i = m_new

    # Padding rows and empty splits saw no key (l_i == 0): divide them by 1.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    acc = acc / l_safe[:, None]
    if FP8_KV:
        acc = acc * v_scale
    if NUM_SPLITS == 1:
        o_rows = (q_start + tok) * stride_o_tok + head * stride_o_head
        tl.store(
            out_ptr + o_rows[:, None] + dims[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )
    else:
        # Partials are [num_tokens, NUM_HEADS, NUM_SPLITS] (x BLOCK_D) in float32.
        part = ((q_start + tok) * NUM_HEADS + head) * NUM_SPLITS + split
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_o_tok,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Weight each split's normalised output by its share of the total softmax
    # mass, 2**(lse_s - max lse); empty splits carry lse = -inf, so weight 0.
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    part = (token * NUM_HEADS + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=splits < NUM_SPLITS, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    o_part = tl.load(
        part_out_ptr + part[:, None] * BLOCK_D + dims[None, :],
        mask=splits[:, None] < NUM_SPLITS,
        other=0.0,
    )
    merged = tl.sum(o_part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(
        out_ptr + token * stride_o_tok + head * stride_o_head + dims,
        merged.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> Tensor:
    """Causal attention of each sequence's new tokens over its paged KV context.

    query [num_tokens, num_heads, head_dim]; caches [num_blocks, block_size,
    num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks] int32; seq_lens
    [num_seqs] int32 counts the new tokens too; query_start_loc [num_seqs + 1] int32.
    `max_query_len` must bound every q_len (it picks the kernel's mode);
    `max_seq_len` only sizes the decode split. `window` w: the token at position p
    sees keys p-w+1 .. p only, and block-table entries of blocks wholly left of
    every new token's window are never read. `softcap` c: scaled scores s become
    c * tanh(s / c) before masking and softmax. `num_splits` forces the split count
    of decode batches (tests); by default it follows the grid size. Caches of
    torch.float8_e4m3fn hold K / k_scale and V / v_scale: their entries count as
    cache.float() * scale; caches of any other dtype ignore the scales.
    Returns `out` (new, in query's dtype, unless given; it may be `query` itself).

    Everything that shapes the launch (grid, splits, compiled variant) comes from
    the host-side ints, the flags window/softcap is None and the caches' dtype, never
    from device tensors, and `window`, `softcap` and the scales enter as plain scalars:
    a CUDA graph captured for one layer replays it with new metadata contents.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("paged_attention needs caches and out with a contiguous last dimension")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must hold at least one key, got {window}")
    group = num_heads // num_kv_heads
    query = _last_dim_contiguous(query)

    keys = max_keys(max_seq_len, max_query_len, block_size, window)
    launch = plan(
        num_tokens, num_seqs, num_kv_heads, group, max_query_len, keys, num_splits,
        query.device,
    )  # fmt: skip
    block_d = triton.next_power_of_2(head_dim)

    part_out = part_lse = out  # placeholders, never touched without a split
    if launch.num_splits > 1:
        part_lse = query.new_empty((num_tokens, num_heads, launch.num_splits), dtype=torch.float32)
        part_out = part_lse.new_empty((*part_lse.shape, block_d))
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    # Float8 tiles go into tl.dot in the query's dtype (every e4m3 value is exact there).
    dot_dtype = _DOT_DTYPES[query.dtype if fp8 else k_cache.dtype]
    if fp8:  # q . (k * k_scale) * scale = q . k * (scale * k_scale)
        scale *= k_scale
    if _INTERPRETED and dot_dtype == tl.bfloat16:
        dot_dtype = tl.float32
    # Float32 caches get true float32 products, not the tensor cores' tf32.
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    # The kernel works in base 2; with a soft-cap, tanh comes from one exp2 of
    # 2 * scores / c (see the kernel).
    if softcap is None:
        qk_scale, softcap_log2 = scale * _LOG2E, 0.0
    else:
        qk_scale, softcap_log2 = 2.0 * _LOG2E * scale / softcap, softcap * _LOG2E
    _attention_kernel[(launch.num_q_blocks, num_kv_heads, launch.num_splits)](
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        part_out, part_lse,
        qk_scale, v_scale, softcap_log2, window or 0, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_M=launch.block_m, BLOCK_Q=launch.block_m // group,
        TILE_N=launch.shape.tile_n(block_d), NUM_SPLITS=launch.num_splits,
        ONE_BLOCK_PER_SEQ=launch.one_block_per_seq, HAS_WINDOW=window is not None,
        SOFTCAP=softcap is not None, FP8_KV=fp8, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        num_warps=launch.shape.num_warps, num_stages=launch.shape.num_stages,
    )  # fmt: skip
    if launch.num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_lse, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            NUM_SPLITS=launch.num_splits, BLOCK_S=triton.next_power_of_2(launch.num_splits),
        )  # fmt: skip
    return out
