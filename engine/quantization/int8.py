"""Weight-only int8 (W8A16): float checkpoints quantized at load, per output channel
and symmetric: W ~ q * scale with q int8 in [-127, 127], scale = max |W row| / 127.

Activations stay in the model's dtype. On a GPU the Triton kernel multiplies the
int8 tiles directly (`use_triton`, chosen from where the weights are); on the CPU
torch's int8-weight matmul does.
"""

from typing import Any

import torch
from torch import nn

import kernels
from engine.quantization import QuantMethod, quantized_linears


class Int8Linear(nn.Module):
    """y = x @ (weight * scale[:, None]).T + bias, weight int8 [out, in], scale float32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.use_triton = weight.is_cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            y = kernels.int8_gemm(x, self.weight, self.scale)
        else:
            rows = x.reshape(-1, self.in_features)
            y = torch._weight_int8pack_mm(rows, self.weight, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale float32 [out]) with weight ~ q * scale[:, None]; an
    all-zero row gets scale 1 (its q is 0 either way)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Method(QuantMethod):
    name = "int8"

    def __init__(self, config: dict[str, Any] | None) -> None:
        if config is not None:
            raise ValueError("int8 quantizes float checkpoints at load; a checkpoint whose "
                             f"quantization_config says int8 ({config}) is a layout pagedq "
                             "does not load")

    def prepare(self, model: nn.Module) -> None:
        """The checkpoint is float: its linears load as they are."""

    def finish(self, model: nn.Module) -> None:
        for parent, attr, linear in list(quantized_linears(model)):
            setattr(parent, attr, Int8Linear(linear))
