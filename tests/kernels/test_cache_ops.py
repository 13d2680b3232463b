"""copy_blocks and swap_blocks against their references."""

import pytest
import torch

from kernels import copy_blocks, reference, swap_blocks


def _kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> torch.Tensor:
    shape = (3, 2, num_blocks, block_size, num_kv_heads, head_dim)  # 3 layers, K and V
    return torch.randn(shape, dtype=torch.bfloat16, device=device)


def _mapping(num_pairs: int, num_src: int, num_dst: int) -> torch.Tensor:
    """Random (src, dst) pairs with distinct sources and distinct destinations."""
    src = torch.randperm(num_src)[:num_pairs]
    dst = torch.randperm(num_dst)[:num_pairs]
    return torch.stack([src, dst], dim=1)


@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim"),
    # 1536 elements a block fit one copy step; 6144 take two, the last one masked.
    [(8, 3, 64), (16, 3, 128)],
)
def test_copy_blocks_matches_reference(
    device: torch.device, block_size: int, num_kv_heads: int, head_dim: int
) -> None:
    num_blocks = 12
    kv_cache = _kv_cache(num_blocks, block_size, num_kv_heads, head_dim, device)
    # Sources among the first half, destinations among the second: no chains.
    pairs = _mapping(4, num_blocks // 2, num_blocks // 2)
    pairs[:, 1] += num_blocks // 2
    expected = kv_cache.clone()
    reference.copy_blocks(expected, pairs)

    copy_blocks(kv_cache, pairs.to(device))

    assert torch.equal(kv_cache, expected)


def _swap_devices() -> list[tuple[str, str]]:
    if torch.cuda.is_available():
        return [("cuda", "cpu"), ("cpu", "cuda")]
    return [("cpu", "cpu")]


@pytest.mark.parametrize(("src_device", "dst_device"), _swap_devices())
def test_swap_blocks_matches_reference(src_device: str, dst_device: str) -> None:
    src = _kv_cache(7, 16, 3, 64, torch.device(src_device))
    dst = _kv_cache(9, 16, 3, 64, torch.device(dst_device))
    if dst.device.type == "cpu" and torch.cuda.is_available():
        dst = dst.pin_memory()
    pairs = _mapping(5, 7, 9)
    expected = dst.clone()
    reference.swap_blocks(src, expected, pairs)

    swap_blocks(src, dst, pairs)

    if dst.is_cuda:
        torch.cuda.synchronize()
    assert torch.equal(dst, expected)


def test_empty_mappings_change_nothing(device: torch.device) -> None:
    kv_cache = _kv_cache(4, 8, 1, 64, device)
    before = kv_cache.clone()
    none = torch.empty(0, 2, dtype=torch.int64)
    copy_blocks(kv_cache, none)
    swap_blocks(kv_cache, kv_cache, none)
    assert torch.equal(kv_cache, before)
