"""Weight-only quantized GEMMs: int8 per output channel (W8A16) and 4-bit groups in
the AWQ and GPTQ packed layouts, each dequantizing its weight tile in registers.

Every program computes a BLOCK_M x BLOCK_N tile of out = x @ W.T (W [N, K] as a
float linear holds it), stepping over the K inputs BLOCK_K at a time: the quantized
tile is loaded, turned into x's dtype and multiplied on the tensor cores with a
float32 accumulator.

The 4-bit layouts, as AutoAWQ and AutoGPTQ write them (eight 4-bit values in each
int32, the first in the lowest bits):
- AWQ: qweight [K, N / 8] packs 8 output columns per int32 in the interleaved order
  0, 2, 4, 6, 1, 3, 5, 7 (nibble i holds column AWQ_ORDER[i]); qzeros [G, N / 8] the
  same way; scales [G, N]. W[n, k] = (q - z) * s of group k // group_size.
- GPTQ: qweight [K / 8, N] packs 8 consecutive inputs per int32; qzeros [G, N / 8]
  packs 8 consecutive columns; scales [G, N]. The "gptq" (v1) format stores each zero
  point minus one, so the real zero is the stored one plus `zero_offset` (1; 0 for
  "gptq_v2").
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# As in paged_attention: the interpreter's tl.dot multiplies bfloat16 operands as
# their raw 16-bit patterns, so there they go in as float32 (rounded to bfloat16 first).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

BLOCK_N = 64
BLOCK_K = 32


def _launch_args(x: Tensor) -> dict:
    """Tile rows sized to the batch (tl.dot needs 16 at least), the dot's dtype and
    precision: float32 gets true float32 products, not tf32."""
    dot_dtype = _DOT_DTYPES[x.dtype]
    if _INTERPRETED and dot_dtype == tl.bfloat16:
        dot_dtype = tl.float32
    return dict(BLOCK_M=16 if x.shape[0] <= 16 else 64, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                DOT_DTYPE=dot_dtype,
                DOT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
                num_warps=4, num_stages=3)


@triton.jit
def _tile_rows_cols(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < M, cols, cols < N


@triton.jit
def _int8_kernel(out_ptr, x_ptr, w_ptr, scale_ptr, M, N, K, stride_xm, stride_wn,
                 stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """out = (x @ w.T) * scale: int8 values are exact in any float dtype, so the scale
    is applied once, to the float32 sums."""
    rows, row_ok, cols, col_ok = _tile_rows_cols(M, N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, (acc * scale[None, :]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _int4_kernel(out_ptr, x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, M, N, K,
                 group_size, stride_xm, stride_om, AWQ: tl.constexpr,
                 HAS_G_IDX: tl.constexpr, GROUP_PER_TILE: tl.constexpr,
                 ZERO_OFFSET: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out = x @ W.T with W dequantized tile by tile from the AWQ or GPTQ layout. With
    GROUP_PER_TILE (groups a whole number of K tiles) a tile's inputs share one group,
    whose zero points and scales are one row; else each input has its own."""
    rows, row_ok, cols, col_ok = _tile_rows_cols(M, N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    packed_cols = N // 8
    # Where column n sits in its int32 (of qzeros, and of AWQ's qweight): AWQ's nibble
    # for column c of 8 is (c % 2) * 4 + c // 2, the inverse of its packing order.
    nibble = cols % 8
    if AWQ:
        nibble = (nibble % 2) * 4 + nibble // 2
    col_shift = (nibble * 4)[None, :]
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        mask = (k < K)[:, None] & col_ok[None, :]
        x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        if AWQ:
            q = tl.load(qweight_ptr + k[:, None].to(tl.int64) * packed_cols
                        + (cols // 8)[None, :], mask=mask, other=0)
            q = (q >> col_shift) & 0xF
        else:
            q = tl.load(qweight_ptr + (k // 8)[:, None].to(tl.int64) * N + cols[None, :],
                        mask=mask, other=0)
            q = (q >> ((k % 8) * 4)[:, None]) & 0xF
        if GROUP_PER_TILE:
            group = (k0 // group_size).to(tl.int64)
            z_mask = col_ok[None, :]
        elif HAS_G_IDX:
            group = tl.load(g_idx_ptr + k, mask=k < K, other=0)[:, None].to(tl.int64)
            z_mask = mask
        else:
            group = (k // group_size)[:, None].to(tl.int64)
            z_mask = mask
        z = tl.load(qzeros_ptr + group * packed_cols + (cols // 8)[None, :], mask=z_mask,
                    other=0)
        z = ((z >> col_shift) & 0xF) + ZERO_OFFSET
        s = tl.load(scales_ptr + group * N + cols[None, :], mask=z_mask, other=0.0)
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _rows(x: Tensor) -> Tensor:
    """x as [M, K] with unit stride along K."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def int8_gemm(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] @ (weight * scale[:, None]).T for an int8 weight [N, K] and its
    per-output-channel scale [N]; returns [..., N] in x's dtype."""
    x2 = _rows(x)
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    M, K = x2.shape
    N = weight.shape[0]
    out = x2.new_empty((M, N))
    if M > 0:
        args = _launch_args(x2)
        grid = (triton.cdiv(M, args["BLOCK_M"]), triton.cdiv(N, BLOCK_N))
        _int8_kernel[grid](out, x2, weight, scale.contiguous(), M, N, K, x2.stride(0),
                           weight.stride(0), out.stride(0), **args)
    return out.view(*x.shape[:-1], N)


def _int4_gemm(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int,
               N: int, K: int, awq: bool, zero_offset: int,
               g_idx: Tensor | None = None) -> Tensor:
    x2 = _rows(x)
    M = x2.shape[0]
    out = x2.new_empty((M, N))
    if M > 0:
        args = _launch_args(x2)
        grid = (triton.cdiv(M, args["BLOCK_M"]), triton.cdiv(N, BLOCK_N))
        _int4_kernel[grid](out, x2, qweight.contiguous(), qzeros.contiguous(),
                           scales.contiguous(), qweight if g_idx is None else g_idx, M, N, K,
                           group_size, x2.stride(0), out.stride(0), AWQ=awq,
                           HAS_G_IDX=g_idx is not None,
                           GROUP_PER_TILE=g_idx is None and group_size % BLOCK_K == 0,
                           ZERO_OFFSET=zero_offset, **args)
    return out.view(*x.shape[:-1], N)


def awq_gemm(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor,
             group_size: int) -> Tensor:
    """x [..., K] @ W for AWQ's qweight [K, N / 8], qzeros [G, N / 8], scales [G, N]
    (G = ceil(K / group_size)); returns [..., N] in x's dtype."""
    K, N = qweight.shape[0], qweight.shape[1] * 8
    return _int4_gemm(x, qweight, qzeros, scales, group_size, N, K, True, 0)


def gptq_gemm(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int,
              zero_offset: int = 1, g_idx: Tensor | None = None) -> Tensor:
    """x [..., K] @ W for GPTQ's qweight [K / 8, N], qzeros [G, N / 8], scales [G, N];
    input k is in group g_idx[k] (int32 [K], act-order checkpoints), or k // group_size
    without it; `zero_offset` is added to the stored zero points (1 for the "gptq"
    format)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    g_idx = None if g_idx is None else g_idx.to(torch.int32).contiguous()
    return _int4_gemm(x, qweight, qzeros, scales, group_size, N, K, False, zero_offset, g_idx)
