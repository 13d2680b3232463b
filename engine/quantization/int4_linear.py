"""The linear of 4-bit AWQ and GPTQ checkpoints, and what their two methods share:
swapping the decoder's linears for it before loading, settling g_idx after.

The module holds the checkpoint's tensors under the checkpoint's names (qweight,
qzeros, scales, g_idx for GPTQ, a float bias when the model has one), in the
checkpoint's packed layout; fused projections (q/k/v, gate/up) hold their shards
side by side along the output columns, so the packed tensors concatenate along
dim 1 (`output_dim`). On a GPU the Triton dequantize-GEMM reads that layout as it
is (`use_triton`, chosen once the weights are on their device); on the CPU each call
dequantizes the weight and multiplies in torch (a float copy kept beside it would
cost the memory the format saves).
"""

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from engine.models.moe import Experts
from engine.models.weights import NUM_SHARDS, PACKED
from engine.quantization import QuantMethod, quantized_linears
from kernels import reference

# A fused projection -> the checkpoint's projections it holds, in order.
_SHARD_NAMES = {fused: [name for name, (f, _) in PACKED.items() if f == fused]
                for fused in {f for f, _ in PACKED.values()}}


@dataclass(frozen=True, slots=True)
class Int4Format:
    """What a checkpoint's quantization_config says about its packed weights."""

    awq: bool  # AWQ's layout, else GPTQ's
    group_size: int  # inputs per scale and zero point; -1: one group spans the input
    zero_offset: int  # added to the stored zero points (GPTQ's v1 stores zero - 1)


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W in 4-bit groups, built on the meta device from the
    float linear it replaces."""

    def __init__(self, linear: nn.Linear, fmt: Int4Format, num_shards: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.out_features % 8 or (not fmt.awq and self.in_features % 8):
            raise ValueError(f"a {self.in_features}x{self.out_features} projection cannot "
                             "hold 4-bit weights packed 8 to an int32")
        self.awq = fmt.awq
        self.zero_offset = fmt.zero_offset
        self.group_size = self.in_features if fmt.group_size == -1 else fmt.group_size
        self.num_shards = num_shards
        groups = -(-self.in_features // self.group_size)
        packed = ((self.in_features, self.out_features // 8) if fmt.awq
                  else (self.in_features // 8, self.out_features))
        self.qweight = _param(packed, torch.int32, output_dim=1)
        self.qzeros = _param((groups, self.out_features // 8), torch.int32, output_dim=1)
        # float16 whatever the model's dtype: what AutoAWQ and AutoGPTQ write, and finer
        # than bfloat16 where the scales matter most.
        self.scales = _param((groups, self.out_features), torch.float16, output_dim=1)
        if fmt.awq:
            self.register_buffer("g_idx", None)
        else:  # every shard's g_idx, one after the other
            self.g_idx = _param((num_shards * self.in_features,), torch.int32, output_dim=0)
        self.bias = linear.bias
        self.use_triton = False

    def finish(self) -> None:
        """Once loaded: the kernel where the weights are on a GPU; GPTQ keeps one g_idx
        for its shards (they share their input, so act-order gives them one order), or
        none when groups follow the inputs in order."""
        self.use_triton = self.qweight.is_cuda
        if self.awq:
            return
        shards = self.g_idx.detach().view(self.num_shards, self.in_features)
        if not bool((shards == shards[0]).all()):
            raise ValueError("the g_idx of the projections fused into one differ; pagedq "
                             "needs q/k/v (and gate/up) quantized in one input order")
        in_order = torch.arange(self.in_features, device=shards.device) // self.group_size
        del self.g_idx
        g_idx = None if bool((shards[0] == in_order).all()) else shards[0].clone()
        self.register_buffer("g_idx", g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            if self.awq:
                y = kernels.awq_gemm(x, self.qweight, self.qzeros, self.scales, self.group_size)
            else:
                y = kernels.gptq_gemm(x, self.qweight, self.qzeros, self.scales,
                                      self.group_size, self.zero_offset, self.g_idx)
            return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, self.dequantized(x.dtype).T, self.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W.T [in, out] in `dtype`."""
        if self.awq:
            w = reference.dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size)
        else:
            w = reference.dequantize_gptq(self.qweight, self.qzeros, self.scales,
                                          self.group_size, self.zero_offset, self.g_idx)
        return w.to(dtype)


def _param(shape: tuple[int, ...], dtype: torch.dtype, output_dim: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    param.output_dim = output_dim
    return param


class Int4Method(QuantMethod):
    """AWQ and GPTQ alike once their configs are read: `fmt` and the checkpoint's
    `modules_to_not_convert` (substrings of the checkpoint names left in float)."""

    def __init__(self, fmt: Int4Format, not_converted: list[str] | None) -> None:
        self.fmt = fmt
        self.not_converted = not_converted or []

    def prepare(self, model: nn.Module) -> None:
        if any(isinstance(m, Experts) for m in model.modules()):
            raise ValueError(f"{self.name} checkpoints of mixture-of-experts models are not "
                             "supported: pagedq's fused experts take float weights only")
        names = {id(m): name for name, m in model.named_modules()}
        for parent, attr, linear in list(quantized_linears(model)):
            if self._kept_float(f"{names[id(parent)]}.{attr}"):
                continue
            setattr(parent, attr, Int4Linear(linear, self.fmt, NUM_SHARDS.get(attr, 1)))

    def finish(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, Int4Linear):
                module.finish()

    def _kept_float(self, name: str) -> bool:
        """Whether the checkpoint left this projection unquantized; a fused one must have
        all of its shards alike."""
        prefix, attr = name.rsplit(".", 1)
        shards = [f"model.{prefix}.{s}" for s in _SHARD_NAMES.get(attr, [attr])]
        kept = [any(entry in s for entry in self.not_converted) for s in shards]
        if any(kept) and not all(kept):
            raise ValueError(f"modules_to_not_convert leaves part of {name} in float "
                             f"({', '.join(s for s, k in zip(shards, kept, strict=True) if k)}):"
                             " its shards are fused into one projection")
        return all(kept)
