"""A sparse mixture of SiLU-gated experts (Mixtral, Qwen3-MoE): a router picks the
top-k experts of each token, and one fused call runs and combines them.

The expert weights are stacked as Transformers 5 keeps them: gate_up_proj
[num_experts, 2 * intermediate, hidden] (gate rows, then up rows) and down_proj
[num_experts, hidden, intermediate].
"""

import torch
from torch import nn

import kernels
from engine.distributed.shard import Shard
from kernels.reference import select_experts


class Experts(nn.Module):
    """This rank's columns of every expert's intermediate size (all on one rank)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 shard: Shard) -> None:
        super().__init__()
        part = shard.part(intermediate_size)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * len(part), hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, len(part)))
        if shard.size > 1:
            self.gate_up_proj.tp_pieces = [(intermediate_size, part)] * 2
            self.down_proj.tp_cols = part


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, renormalize: bool, shard: Shard) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router, whole
        self.experts = Experts(hidden_size, intermediate_size, num_experts, shard)
        self.top_k = top_k
        self.renormalize = renormalize
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        # The Triton kernel on a GPU; on the CPU the plain-torch path (the package loads
        # Triton only for the names asked for).
        moe = kernels.fused_moe if x.is_cuda else kernels.fused_moe_torch
        out = moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        return self.shard.all_reduce(out)
