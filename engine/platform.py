"""What an `EngineConfig` means on this machine: its device and dtype (the attention
backend is `engine.attention_factory`'s choice).

Kept apart from `engine.config` because the answers need torch (and CUDA's
presence), while the config itself must stay importable without it.
"""

import torch

from engine.config import EngineConfig


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)



def resolve_kv_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's, or float8 e4m3 (half of bf16's bytes)."""
    return torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else dtype
