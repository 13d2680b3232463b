"""Block copies inside one KV pool (copy-on-write)."""

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements moved per step of a program's loop over one block (a block of
# 16 tokens x 8 heads x 128 dims is 16K elements: a few steps each).
_CHUNK = 4096


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,
    mapping_ptr,
    stride_plane,
    stride_block,
    BLOCK_NUMEL: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # Program (pair, plane) copies one whole block of one (layer, K|V) plane, so
    # every layer, K and V of every pair moves in a single launch.
    pair = tl.program_id(0)
    plane = tl.program_id(1)
    src = tl.load(mapping_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(mapping_ptr + 2 * pair + 1).to(tl.int64)
    plane_ptr = cache_ptr + plane.to(tl.int64) * stride_plane
    src_ptr = plane_ptr + src * stride_block
    dst_ptr = plane_ptr + dst * stride_block
    for start in range(0, BLOCK_NUMEL, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def _planes(cache: Tensor) -> Tensor:
    """View [num_layers, 2, num_blocks, *block] as [num_layers * 2, num_blocks, block_numel],
    a float8 pool as its bytes (a copy moves bits; GPUs before sm89 have no float8 type)."""
    if cache.dtype == torch.float8_e4m3fn:
        cache = cache.view(torch.uint8)
    num_layers, two, num_blocks = cache.shape[:3]
    return cache.view(num_layers * two, num_blocks, -1)


def copy_blocks(kv_cache: Tensor, block_mapping: Tensor) -> None:
    """Copy block src -> dst in every layer, K and V, in one launch.

    kv_cache is [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] with
    each block contiguous; block_mapping is [num_pairs, 2] (src, dst), on any device.
    A dst must not also appear as a src (pairs run in parallel, in no set order).
    """
    if block_mapping.numel() == 0:
        return
    planes = _planes(kv_cache)
    if planes.stride(2) != 1:
        raise ValueError("copy_blocks needs every cache block to be contiguous")
    mapping = block_mapping.to(kv_cache.device, non_blocking=True).contiguous()
    grid = (mapping.shape[0], planes.shape[0])
    _copy_blocks_kernel[grid](
        planes,
        mapping,
        planes.stride(0),
        planes.stride(1),
        BLOCK_NUMEL=planes.shape[2],
        CHUNK=min(_CHUNK, triton.next_power_of_2(planes.shape[2])),
    )

