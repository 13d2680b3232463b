"""Engine configuration: one validated record of every knob the engine reads.

Torch-free, so that the worker's settings can be derived from it without
importing torch; `engine.platform` turns the names into torch objects.
"""

import math
from dataclasses import dataclass
from typing import Literal

PreemptionMode = Literal["swap", "recompute"]
AttentionBackendName = Literal["auto", "torch", "triton"]
KVCacheDtype = Literal["auto", "fp8"]

# Weight formats `quantization` names: fp8 and int8 quantize float weights at load
# (or load an FP8 checkpoint as published); awq and gptq load 4-bit checkpoints.
QUANTIZATION_METHODS = ("fp8", "int8", "awq", "gptq")

# The names `dtype` accepts besides "auto"; each is an attribute of the torch module.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# On a CPU there is no memory to profile: the pool gets this much unless
# `num_device_blocks` says otherwise (vLLM's CPU backend defaults to 4 GiB too).
CPU_KV_CACHE_GIB = 4.0


def check_block_size(backend: str, block_size: int) -> None:
    """The Triton kernels take blocks of 8 to 64 tokens. Checked here for an explicit
    backend, and again by `engine.platform` once "auto" has become one."""
    if backend == "triton" and not 8 <= block_size <= 64:
        raise ValueError(f"block_size must be 8 to 64 with the triton backend, got {block_size}")


@dataclass(slots=True)
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_device_blocks: int | None = None
    swap_space_gib: float = 4.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    preemption_mode: PreemptionMode = "swap"
    enable_prefix_caching: bool = True
    share_blocks: bool = True  # False copies every block on fork (to measure sharing)
    attention_backend: AttentionBackendName = "auto"
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    quantization: str | None = None     # None: as the checkpoint's quantization_config says
    kv_cache_dtype: KVCacheDtype = "auto"  # "fp8": K/V stored as float8 e4m3
    tensor_parallel_size: int = 1
    # A request that has waited (queued or preempted) this many seconds moves up one
    # priority level, so that a flood of more important work cannot starve it; None: never.
    priority_aging_s: float | None = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        check_block_size(self.attention_backend, self.block_size)
        if self.num_device_blocks is not None and self.num_device_blocks < 1:
            raise ValueError(f"num_device_blocks must be >= 1, got {self.num_device_blocks}")
        if not 0 <= self.swap_space_gib < math.inf:
            raise ValueError(f"swap_space_gib must be finite and >= 0, got {self.swap_space_gib}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.preemption_mode not in ("swap", "recompute"):
            raise ValueError(
                f"preemption_mode must be 'swap' or 'recompute', got {self.preemption_mode!r}"
            )
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                "attention_backend must be 'auto', 'torch' or 'triton', "
                f"got {self.attention_backend!r}"
            )
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be None or one of {list(QUANTIZATION_METHODS)}, "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.device.startswith("cuda:"):
            raise ValueError("tensor_parallel_size > 1 places rank r on cuda:r: give device "
                             f"'auto' or 'cuda', got {self.device!r}")
        if self.priority_aging_s is not None and not 0 < self.priority_aging_s < math.inf:
            raise ValueError("priority_aging_s must be None or a positive number of seconds, "
                             f"got {self.priority_aging_s}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

