"""Triton kernels for the paged KV cache, mixtures of experts and quantized GEMMs,
with plain-torch references in `reference`.

The package knows nothing of the engine: tensors in, tensors out. Names are
imported on first use, so that the torch backend, which needs only the plain-torch
`swap_blocks` and `fused_moe_torch`, runs where Triton is not installed (it is Linux-only). Take the
functions from the package, not their modules: `import kernels.store_kv` binds the
module, not the function, to the package's `store_kv`.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_HOMES = {
    "awq_gemm": "kernels.quant_gemm",
    "copy_blocks": "kernels.copy_blocks",
    "fused_moe": "kernels.fused_moe",
    "fused_moe_torch": "kernels.moe_torch",
    "gptq_gemm": "kernels.quant_gemm",
    "int8_gemm": "kernels.quant_gemm",
    "paged_attention": "kernels.paged_attention",
    "store_kv": "kernels.store_kv",
    "swap_blocks": "kernels.swap",
}

__all__ = [
    "awq_gemm",
    "copy_blocks",
    "fused_moe",
    "fused_moe_torch",
    "gptq_gemm",
    "int8_gemm",
    "paged_attention",
    "store_kv",
    "swap_blocks",
]

if TYPE_CHECKING:
    from kernels.copy_blocks import copy_blocks
    from kernels.fused_moe import fused_moe
    from kernels.moe_torch import fused_moe_torch
    from kernels.paged_attention import paged_attention
    from kernels.quant_gemm import awq_gemm, gptq_gemm, int8_gemm
    from kernels.store_kv import store_kv
    from kernels.swap import swap_blocks


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    # Importing a module binds it as an attribute of the package under its own name,
    # which for four of them is the function's: bind the function last.
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
