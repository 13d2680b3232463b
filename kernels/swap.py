"""Block moves between pools on different devices (swapping): plain torch, no Triton,
so that the torch backend can swap where Triton is not installed."""

import torch
from torch import Tensor


def swap_blocks(src_cache: Tensor, dst_cache: Tensor, block_mapping: Tensor) -> None:
    """Move blocks between pools on different devices (GPU pool <-> pinned CPU pool).

    Both caches are [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim];
    block_mapping is [num_pairs, 2] (src, dst).
    One gather on the source device, one transfer, one scatter on the destination
    device move every layer, K and V.
    """
    if block_mapping.numel() == 0:
        return
    if src_cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernel: move bytes
        src_cache, dst_cache = src_cache.view(torch.uint8), dst_cache.view(torch.uint8)
    mapping = block_mapping.cpu()
    src_idx = mapping[:, 0].to(src_cache.device)
    dst_idx = mapping[:, 1].to(dst_cache.device)
    gathered = src_cache.index_select(2, src_idx)
    if dst_cache.device.type == "cuda" and gathered.device.type == "cpu":
        # A pinned staging buffer lets the upload run asynchronously; the caching
        # host allocator keeps it alive until the copy has finished.
        moved = gathered.pin_memory().to(dst_cache.device, non_blocking=True)
    else:
        # Towards the CPU the copy must be synchronous: the CPU scatter below
        # reads the data at once, outside any CUDA stream order.
        moved = gathered.to(dst_cache.device)
    dst_cache.index_copy_(2, dst_idx, moved)
