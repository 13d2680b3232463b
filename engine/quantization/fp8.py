"""FP8 (e4m3) weights: float checkpoints quantized at load with one scale per output
channel, and checkpoints published in FP8 with one scale per weight block (the
`weight_block_size` / `weight_scale_inv` layout of Qwen3-FP8 and DeepSeek).

On a GPU with FP8 tensor cores (compute capability 8.9 and up) a linear quantizes its
input per token at run time and multiplies through `torch._scaled_mm`; a block-scaled
weight is first re-rounded to per-channel scales, the layout that call takes. Elsewhere
(the CPU, older GPUs) the weight is converted to the activations' dtype for each call
(block scales applied to it, channel scales to the outputs) and the activations are not
quantized: there the method measures the cost of rounding the weights alone.
"""

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.moe import SparseMoE
from engine.quantization import QuantMethod, quantized_linears

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# The value of every float8 bit pattern: the CPU casts float8 one element at a time, and
# a table lookup is about five times faster, which is most of a CPU step's added cost.
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8).float()
# The lookup's index and result buffers, by dtype, reused from call to call (a process
# runs one model step at a time): a fresh allocation of a weight's size costs the CPU as
# many page faults as the lookup itself.
_scratch: dict[torch.dtype, torch.Tensor] = {}


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (float8 values, float32 scale per row), x ≈ values * scale."""
    x = x.float()
    scale = x.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_values(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 `w` in `dtype`, exactly (every e4m3 value is a bfloat16, float16 and float32).
    On the CPU the result is a buffer the next call overwrites: use it at once."""
    if w.device.type != "cpu":
        return w.to(dtype)
    index = _buffer(torch.int32, w.numel())
    index.copy_(w.view(torch.uint8).flatten())
    values = _buffer(dtype, w.numel())
    torch.index_select(_FP8_VALUES.to(dtype), 0, index, out=values)
    return values.view(w.shape)


def _buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    buffer = _scratch.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def fp8_matmul_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class Fp8Linear(nn.Module):
    """y = x W^T + b with W = weight * weight_scale[:, None]: weight float8 [out, in],
    one float32 scale per output channel, the bias in the model's dtype."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _frozen(weight)
        self.weight_scale = _frozen(weight_scale.float().contiguous())
        self.bias = None if bias is None else _frozen(bias)
        # _scaled_mm wants both matrix dimensions of the weight in multiples of 16.
        self.scaled_mm = (fp8_matmul_supported(weight.device)
                          and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Fp8Linear":
        weight, scale = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scaled_mm:
            # A channel's scale factors out of its dot products: applied to the outputs,
            # it spares a pass over the weight.
            y = F.linear(x, fp8_values(self.weight, x.dtype)) * self.weight_scale.to(x.dtype)
            return y if self.bias is None else y + self.bias
        rows = x.reshape(-1, self.in_features)
        x_fp8, x_scale = quantize_rows(rows)
        # Row-wise scales: [M, 1] for the tokens, [1, N] for the channels; the weight
        # goes in column-major ([in, out] as a transposed view), as cuBLAS requires.
        y = torch._scaled_mm(x_fp8, self.weight.t(), x_scale[:, None],
                             self.weight_scale[None, :], out_dtype=torch.bfloat16)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Fp8BlockLinear(nn.Module):
    """A linear as FP8 checkpoints publish it: weight float8 [out, in] and
    weight_scale_inv float32 [ceil(out / bo), ceil(in / bi)], one scale (a multiplier,
    despite its name) per [bo, bi] block. Runs by dequantizing the weight."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int]) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.block = block
        device = linear.weight.device
        rows, cols = math.ceil(self.out_features / block[0]), math.ceil(self.in_features / block[1])
        self.weight = _frozen(torch.empty(self.out_features, self.in_features, dtype=FP8,
                                          device=device))
        self.weight_scale_inv = _frozen(torch.empty(rows, cols, dtype=torch.float32,
                                                    device=device))
        self.bias = linear.bias

    def dequantize(self) -> torch.Tensor:
        """The weight in float32: every block times its scale."""
        scale = (self.weight_scale_inv.repeat_interleave(self.block[0], 0)[:self.out_features]
                 .repeat_interleave(self.block[1], 1)[:, :self.in_features])
        return fp8_values(self.weight, torch.float32) * scale

    def to_per_channel(self) -> Fp8Linear:
        weight, scale = quantize_rows(self.dequantize())
        return Fp8Linear(weight, scale, None if self.bias is None else self.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)


def _checkpoint_block(config: dict[str, Any]) -> tuple[int, int]:
    """The block size of an FP8 checkpoint pagedq can run, or a ValueError saying why not."""
    scheme = config.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"this FP8 checkpoint has activation_scheme {scheme!r} (fixed input "
                         "scales); pagedq loads FP8 checkpoints with 'dynamic' activations only")
    if config.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"this FP8 checkpoint stores {config['fmt']!r} values; pagedq loads e4m3")
    block = config.get("weight_block_size")
    if not block or len(block) != 2:
        raise ValueError("this FP8 checkpoint has no weight_block_size [rows, cols] in its "
                         "quantization_config; pagedq loads block-scaled FP8 checkpoints "
                         "(weight_scale_inv per block) only")
    return int(block[0]), int(block[1])


def _shard_rows(parent: nn.Module, attr: str, linear: nn.Linear) -> tuple[int, ...]:
    """The output rows of each checkpoint tensor a (possibly fused) linear is built from."""
    if attr == "qkv_proj":
        return parent.q_size, parent.kv_size, parent.kv_size
    if attr == "gate_up_proj":
        return linear.out_features // 2, linear.out_features // 2
    return (linear.out_features,)


def _check_shards(name: str, shards: tuple[int, ...], block_rows: int) -> None:
    """Fused shards' scales are concatenated as loaded: they line up with the fused
    weight's blocks only when every shard but the last fills whole blocks."""
    if any(rows % block_rows for rows in shards[:-1]):
        raise ValueError(f"{name} is fused from checkpoint tensors of {list(shards)} rows, not "
                         f"all multiples of the FP8 block's {block_rows} rows: the block "
                         "scales of the fused weight would not line up")


def _has_experts(model: nn.Module) -> bool:
    return any(isinstance(m, SparseMoE) for m in model.modules())


class Fp8Method(QuantMethod):
    """config None: quantize float weights at load; else the checkpoint's
    quantization_config (block-scaled FP8)."""

    name = "fp8"

    def __init__(self, config: dict[str, Any] | None) -> None:
        self.block = None if config is None else _checkpoint_block(config)

    def prepare(self, model: nn.Module) -> None:
        if self.block is None:
            return
        if _has_experts(model):
            raise ValueError("FP8 checkpoints of mixture-of-experts models are not supported "
                             "(their expert weights are float8); load a float checkpoint with "
                             "quantization='fp8' instead")
        for parent, attr, linear in list(quantized_linears(model)):
            _check_shards(attr, _shard_rows(parent, attr, linear), self.block[0])
            setattr(parent, attr, Fp8BlockLinear(linear, self.block))

    def finish(self, model: nn.Module) -> None:
        if self.block is None:
            if _has_experts(model):
                logger.info("fp8: the experts' weights stay in %s; only attention and dense "
                            "projections are quantized", next(model.parameters()).dtype)
            for parent, attr, linear in list(quantized_linears(model)):
                setattr(parent, attr, Fp8Linear.from_float(linear))
            return
        for parent in list(model.modules()):
            for attr, child in list(parent.named_children()):
                if isinstance(child, Fp8BlockLinear) and fp8_matmul_supported(child.weight.device):
                    setattr(parent, attr, child.to_per_channel())
