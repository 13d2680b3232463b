"""The KV tensors: the device pool, the CPU swap pool and the copies between them
(which the attention backend performs: it alone knows its kernels)."""

import torch

from engine.attention import AttentionBackend


class CacheEngine:
    """One tensor per pool, [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim],
    so a copy or a swap moves a block of every layer in one batched operation."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_device_blocks: int, num_cpu_blocks: int, dtype: torch.dtype,
                 device: torch.device, backend: AttentionBackend) -> None:
        shape = (num_layers, 2, block_size, num_kv_heads, head_dim)
        self.backend = backend
        self.device_cache = torch.empty(_with_blocks(shape, num_device_blocks), dtype=dtype,
                                        device=device)
        self.cpu_cache = torch.empty(_with_blocks(shape, num_cpu_blocks), dtype=dtype,
                                     device="cpu", pin_memory=device.type == "cuda")

    @staticmethod
    def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def swap_out(self, mapping: dict[int, int]) -> None:
        if mapping:
            self.backend.swap_blocks(self.device_cache, self.cpu_cache, _pairs(mapping))

    def swap_in(self, mapping: dict[int, int]) -> None:
        if mapping:
            self.backend.swap_blocks(self.cpu_cache, self.device_cache, _pairs(mapping))

    def copy(self, pairs_list: list[tuple[int, int]]) -> None:
        if not pairs_list:
            return
        pairs = torch.tensor(pairs_list, dtype=torch.int64, device=self.device_cache.device)
        self.backend.copy_blocks(self.device_cache, pairs)


def _with_blocks(shape: tuple[int, ...], num_blocks: int) -> tuple[int, ...]:
    return (*shape[:2], num_blocks, *shape[2:])


def _pairs(mapping: dict[int, int]) -> torch.Tensor:
    return torch.tensor(list(mapping.items()), dtype=torch.int64)
