"""A sparse mixture of SiLU-gated experts (Mixtral, Qwen3-MoE): a router picks the
top-k experts of each token, and one fused call runs and combines them.

The expert weights are stacked as Transformers 5 keeps them: gate_up_proj
[num_experts, 2 * intermediate, hidden] (gate rows, then up rows) and down_proj
[num_experts, hidden, intermediate].
"""

import torch
from torch import nn

import kernels
from kernels.reference import select_experts


class Experts(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = Experts(hidden_size, intermediate_size, num_experts)
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        # The Triton kernel on a GPU; on the CPU the plain-torch path (the package loads
        # Triton only for the names asked for).
        moe = kernels.fused_moe if x.is_cuda else kernels.fused_moe_torch
        return moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
