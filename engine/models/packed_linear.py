"""Linear layers with oneDNN-prepacked weights, for the CPU.

Behind `nn.Linear`, MKL's sgemm reads an [out, in] weight slowly when the batch
has few rows, as in every decode step: memory-bound, it should stream weights at
memory speed and does not. oneDNN, given the weight reordered once into its own
blocked layout, reads it up to twice as fast at 4 to 32 rows (bench/RESULTS.md).
The math is the same; the summation order differs, so outputs agree to rounding.
"""

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach()), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> None:
    """Swap every `nn.Linear` of a CPU model for a `PackedLinear` (tied weights get
    their own packed copy); a torch built without oneDNN keeps its linears."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
