"""Triton kernels for the paged KV cache, with plain-torch references in `reference`.

The package knows nothing of the engine: tensors in, tensors out.
"""

from kernels.copy_blocks import copy_blocks, swap_blocks
from kernels.paged_attention import paged_attention
from kernels.store_kv import store_kv

__all__ = ["copy_blocks", "paged_attention", "store_kv", "swap_blocks"]
