"""Choose the attention backend: the one place that reads a backend's name."""

import torch

from engine.attention import AttentionBackend
from engine.config import check_block_size
from engine.torch_attention import TorchBackend
from engine.triton_attention import TritonBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchBackend, "triton": TritonBackend}


def make_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """The backend called `name`; "auto" is Triton on CUDA and torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be 'auto' or one of {sorted(BACKENDS)}, "
                         f"got {name!r}")
    # Checked again: the config could not check the name "auto" stood for.
    check_block_size(name, block_size)
    return BACKENDS[name](block_size)
