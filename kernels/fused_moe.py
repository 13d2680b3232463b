"""Fused mixture-of-experts MLP: route, grouped gate/up GEMM with SiLU, grouped down GEMM, combine.

Each token goes to `top_k` experts; each (token, slot) pair is one row of work.
The pairs are sorted by expert and every expert's group is padded to a whole
number of BLOCK_M-row tiles, so that each row tile belongs to one expert. One
launch then runs the gate/up GEMM for every tile of every expert (the gate and up
halves share the loaded activations, and silu(gate) * up is applied before the
store); a second launch runs the down GEMM and scales each row by its routing
weight. The per-pair results, in (token, slot) order, are summed over the k slots
of each token.
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# As in paged_attention: the interpreter's tl.dot multiplies bfloat16 operands as
# their raw 16-bit patterns, so there they go in as float32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Tiles:
    """Rows (pairs) per tile, output columns per program, reduction step, warps."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Decode batches give each expert a handful of rows: a 16-row tile (tl.dot's
# minimum) wastes the least padding. Prefill fills larger tiles.
_DECODE = _Tiles(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
_PREFILL = _Tiles(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)


@dataclass(frozen=True)
class _Routing:
    """Pairs grouped by expert: `pairs[i]` is the pair index (token * top_k + slot)
    in padded row i, or num_pairs for padding; `tile_expert[b]` is the expert of row
    tile b, or -1 for tiles past the last expert's group."""

    pairs: Tensor
    tile_expert: Tensor


def _route(topk_ids: Tensor, num_experts: int, block_m: int) -> _Routing:
    """Sort the (token, slot) pairs by expert and pad each group to whole tiles.

    Sizes are bounded without reading the counts back to the host: at most
    min(num_pairs, num_experts) experts get pairs, each wasting under one tile.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    pair_start = torch.cumsum(counts, 0) - counts
    padded_start = (tile_end - tiles) * block_m

    num_tiles = triton.cdiv(num_pairs, block_m) + min(num_pairs, num_experts)
    expert_of_sorted = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - pair_start[expert_of_sorted]
    pairs = flat.new_full((num_tiles * block_m,), num_pairs, dtype=torch.int32)
    pairs[padded_start[expert_of_sorted] + rank] = order.to(torch.int32)
    # Tile b belongs to the first expert whose tiles end after it.
    tile_expert = torch.searchsorted(
        tile_end, torch.arange(num_tiles, device=flat.device), right=True
    )
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return _Routing(pairs, tile_expert)


@triton.jit
def _tile(tile_expert_ptr, pairs_ptr, num_pairs, num_cols,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: its expert (-1 for a spare tile), its rows' pairs (padding
    rows hold num_pairs) and its output columns, with their masks."""
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    pair = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, pair, pair < num_pairs, cols, cols < num_cols


@triton.jit
def _gate_up_kernel(
    act_ptr,
    hidden_ptr,
    w13_ptr,
    pairs_ptr,
    tile_expert_ptr,
    num_pairs,
    hidden_size,
    inter_size,
    stride_h_tok,
    stride_w_exp,
    stride_w_row,
    stride_a_pair,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """act[pair, n] = silu(x @ w_gate[n]) * (x @ w_up[n]) for one tile of one expert."""
    expert, pair, row_ok, cols, col_ok = _tile(tile_expert_ptr, pairs_ptr, num_pairs,
                                               inter_size, BLOCK_M, BLOCK_N)
    if expert < 0:
        return
    token = (pair // TOP_K).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = hidden_ptr + token[:, None] * stride_h_tok + ks[None, :]
    # Weights come in transposed, [BLOCK_K, BLOCK_N]: the up rows follow the gate rows.
    w_base = w13_ptr + expert.to(tl.int64) * stride_w_exp
    gate_ptrs = w_base + cols[None, :].to(tl.int64) * stride_w_row + ks[:, None]
    up_ptrs = w_base + (inter_size + cols)[None, :].to(tl.int64) * stride_w_row + ks[:, None]
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = ks < hidden_size - k0
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(gate_ptrs + k0, mask=w_mask, other=0.0).to(DOT_DTYPE)
        w_up = tl.load(up_ptrs + k0, mask=w_mask, other=0.0).to(DOT_DTYPE)
        gate = tl.dot(x, w_gate, gate, input_precision=DOT_PRECISION)
        up = tl.dot(x, w_up, up, input_precision=DOT_PRECISION)

    act = gate * tl.sigmoid(gate) * up
    out_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_a_pair + cols[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    out_ptr,
    act_ptr,
    w2_ptr,
    weights_ptr,
    pairs_ptr,
    tile_expert_ptr,
    num_pairs,
    hidden_size,
    inter_size,
    stride_a_pair,
    stride_w_exp,
    stride_w_row,
    stride_o_pair,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[pair, n] = weight[pair] * (act[pair] @ w2[expert, n]) for one tile of one expert."""
    expert, pair, row_ok, cols, col_ok = _tile(tile_expert_ptr, pairs_ptr, num_pairs,
                                               hidden_size, BLOCK_M, BLOCK_N)
    if expert < 0:
        return
    pair64 = pair.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + pair64[:, None] * stride_a_pair + ks[None, :]
    w_ptrs = (
        w2_ptr + expert.to(tl.int64) * stride_w_exp
        + cols[None, :].to(tl.int64) * stride_w_row + ks[:, None]
    )  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        k_ok = ks < inter_size - k0
        a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    weight = tl.load(weights_ptr + pair, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pair64[:, None] * stride_o_pair + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_moe(
    hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor
) -> Tensor:
    """The experts' SwiGLU MLPs of every token, weighted and summed over its top_k experts.

    hidden [T, H]; w13 [E, 2*I, H] (gate rows, then up rows); w2 [E, H, I];
    topk_weights [T, k] (float32); topk_ids [T, k] integer expert ids. Returns
    out[t] = sum_j topk_weights[t, j] * (silu(gate) * up)(expert topk_ids[t, j]) @ w2[e].T
    as a new [T, H] tensor in hidden's dtype; products accumulate in float32.
    """
    num_tokens, hidden_size = hidden.shape
    num_experts, inter_size = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return hidden.new_zeros((num_tokens, hidden_size))
    hidden, w13, w2 = (_last_dim_contiguous(t) for t in (hidden, w13, w2))
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()

    tiles = _DECODE if num_pairs <= _DECODE.block_m * num_experts else _PREFILL
    routing = _route(topk_ids, num_experts, tiles.block_m)
    num_tiles = routing.tile_expert.numel()
    dot_dtype = _DOT_DTYPES[hidden.dtype]
    if _INTERPRETED and dot_dtype == tl.bfloat16:
        dot_dtype = tl.float32
    # Float32 inputs get true float32 products, not the tensor cores' tf32.
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    launch = dict(
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip

    act = hidden.new_empty((num_pairs, inter_size))
    _gate_up_kernel[(num_tiles, triton.cdiv(inter_size, tiles.block_n))](
        act, hidden, w13, routing.pairs, routing.tile_expert,
        num_pairs, hidden_size, inter_size,
        hidden.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, **launch,
    )  # fmt: skip
    per_pair = hidden.new_empty((num_pairs, hidden_size))
    _down_kernel[(num_tiles, triton.cdiv(hidden_size, tiles.block_n))](
        per_pair, act, w2, weights, routing.pairs, routing.tile_expert,
        num_pairs, hidden_size, inter_size,
        act.stride(0), w2.stride(0), w2.stride(1), per_pair.stride(0),
        **launch,
    )  # fmt: skip
    # The k slots of a token are summed in float32 (and rounded once).
    combined = per_pair.view(num_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32)
    return combined.to(hidden.dtype)
