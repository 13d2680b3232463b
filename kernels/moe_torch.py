"""Mixture-of-experts MLP in plain torch, for the CPU: same contract as `kernels.fused_moe`.

The (token, slot) pairs are sorted by expert once; each expert that received
tokens then gathers them, runs its two matrix products, and adds its weighted
output back. Experts that got no token cost nothing.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def fused_moe_torch(
    hidden: Tensor, w13: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor
) -> Tensor:
    """The experts' SwiGLU MLPs of every token, weighted and summed over its top_k experts.

    hidden [T, H]; w13 [E, 2*I, H] (gate rows, then up rows); w2 [E, H, I];
    topk_weights [T, k] (float32); topk_ids [T, k] integer expert ids. Returns a new
    [T, H] tensor in hidden's dtype; the weighted sum accumulates in float32.
    """
    num_tokens, top_k = topk_ids.shape
    inter_size = w2.shape[2]
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    if num_tokens == 0:
        return out.to(hidden.dtype)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    tokens = order // top_k
    weights = topk_weights.reshape(-1)[order].float()
    counts = torch.bincount(flat_ids, minlength=w2.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        expert_tokens = tokens[start:end]
        gate_up = torch.mm(hidden.index_select(0, expert_tokens), w13[expert].t())
        act = F.silu(gate_up[:, :inter_size]) * gate_up[:, inter_size:]
        expert_out = torch.mm(act, w2[expert].t()) * weights[start:end, None]
        out.index_add_(0, expert_tokens, expert_out)
        start = end
    return out.to(hidden.dtype)
