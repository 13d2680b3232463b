"""Write the new tokens' keys and values into the paged KV cache.

A float8 cache (e4m3) holds key / k_scale and value / v_scale, saturated at the
format's largest finite value, 448, so that outliers do not become NaN. The kernel
rounds to float8 with its own integer arithmetic, to nearest and ties to even as
torch's `.to(torch.float8_e4m3fn)` does: Triton's interpreter rounds float8 wrongly
(ties away from zero, and a mantissa carry corrupts the exponent), and the same
code on every device keeps the CPU tests exact for the GPU too.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _to_e4m3(x):
    """float32 -> the bits of the nearest float8 e4m3 (ties to even), saturated at 448,
    as int32 in 0 .. 255."""
    x = tl.clamp(x, -448.0, 448.0)  # the largest finite e4m3 value
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # From 2**-6 up (normal in e4m3): keep 3 mantissa bits, rounding to nearest even on
    # the whole magnitude so that a carry moves into the exponent; then rebias 127 -> 7.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # Below 2**-6 (subnormal, steps of 2**-9): 2**14 + |x| has an ulp of 2**-9, so the
    # float add rounds |x| there, and the low bits of the sum count its steps.
    subnormal = (tl.abs(x) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    code = tl.where(mag < 0x3C800000, subnormal, normal)
    return tl.where(bits < 0, code | 0x80, code)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_scale,
    v_scale,
    stride_key_tok,
    stride_key_head,
    stride_value_tok,
    stride_value_head,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
):
    # One program per token moves all of its heads at once: [BLOCK_H, BLOCK_D].
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token: nothing to write
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    key = tl.load(
        key_ptr + token * stride_key_tok + heads[:, None] * stride_key_head + dims[None, :],
        mask=mask,
    )
    value = tl.load(
        value_ptr + token * stride_value_tok + heads[:, None] * stride_value_head + dims[None, :],
        mask=mask,
    )
    if FP8:  # the caches come as bytes
        key = _to_e4m3(tl.math.div_rn(key.to(tl.float32), k_scale))
        value = _to_e4m3(tl.math.div_rn(value.to(tl.float32), v_scale))
    # Block ids are int64 so that offsets into caches over 2**31 elements stay exact.
    k_dst = k_cache_ptr + block * stride_k_blk + offset * stride_k_slot
    v_dst = v_cache_ptr + block * stride_v_blk + offset * stride_v_slot
    tl.store(
        k_dst + heads[:, None] * stride_k_head + dims[None, :],
        key.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_dst + heads[:, None] * stride_v_head + dims[None, :],
        value.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def store_kv(
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into the caches.

    Caches are [num_blocks, block_size, num_kv_heads, head_dim] with a contiguous
    last dimension; slot = block_id * block_size + offset, and slot -1 is skipped.
    key/value may be strided views (e.g. slices of a fused QKV output).
    A float8_e4m3fn cache receives (key.float() / k_scale).clamp(-448, 448) and
    likewise for values (IEEE float32 division, then one rounding to float8);
    a cache of any other dtype ignores the scales.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("store_kv needs caches whose last dimension is contiguous")
    key = _last_dim_contiguous(key)
    value = _last_dim_contiguous(value)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        FP8=fp8,
    )
