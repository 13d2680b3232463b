"""Checkpoint tensors -> a model's parameters: renames, fused projections assembled
from their shards, per-expert tensors stacked, every parameter loaded exactly once.

A parameter whose output rows are not its first dimension (a packed quantized
layout such as AWQ's qweight [in, out / 8]) says so with an `output_dim` attribute:
its shards are concatenated along that dimension."""

import re
from collections.abc import Iterable

import torch
from torch import nn

from engine.models.tp_rules import shard_piece

# Checkpoint projections folded into the fused ones: name -> (fused name, shard index).
PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
NUM_SHARDS = {"qkv_proj": 3, "gate_up_proj": 2, "down_proj": 1}
EXPERT = re.compile(r"(?P<prefix>.*\.experts)\.(?P<index>\d+)\.(?P<proj>\w+)\.weight")
# A checkpoint's per-tensor KV-cache scales (an FP8 KV scheme), under the attention or
# its k/v projection: they set the layer's `k_scale` / `v_scale` for a float8 cache.
KV_SCALE = re.compile(r"(?P<attn>.*\.self_attn)\.(?:[kv]_proj\.)?(?P<which>[kv]_scale)")


class WeightLoader:
    """Loads a checkpoint's tensors into `model` by its parameter names.

    `renames` are (checkpoint substring, model substring) pairs applied first (Mixtral's
    block_sparse_moe.experts.N.w1 -> mlp.experts.N.gate_proj); `skipped` names are
    computed, not loaded (rotary tables, a tied lm_head).
    """

    def __init__(self, model: nn.Module, renames: tuple[tuple[str, str], ...],
                 skipped: set[str]) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.renames = renames
        self.skipped = skipped
        self.shards: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self.loaded: set[str] = set()

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            name = name.removeprefix("model.")
            for old, new in self.renames:
                name = name.replace(old, new)
            if "rotary_emb" in name or name in self.skipped:
                continue
            self._take(name, tensor)
        missing = set(self.params) - self.loaded - self.skipped
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")

    def _take(self, name: str, tensor: torch.Tensor) -> None:
        kv_scale = KV_SCALE.fullmatch(name)
        if kv_scale:
            attn = self.model.get_submodule(kv_scale["attn"])
            setattr(attn, kv_scale["which"], float(tensor.float().max()))
            return
        expert = EXPERT.fullmatch(name)
        if expert:
            fused, shard = PACKED.get(expert["proj"], (expert["proj"], 0))
            target = f"{expert['prefix']}.{fused}"
            self._add_shard(target, NUM_SHARDS[fused], (int(expert["index"]), shard), tensor)
            return
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in PACKED:
            fused, shard = PACKED[parts[-2]]
            target = ".".join([*parts[:-2], fused, parts[-1]])
            self._add_shard(target, NUM_SHARDS[fused], (0, shard), tensor)
            return
        self._copy(name, tensor)

    def _add_shard(self, target: str, per_expert: int, key: tuple[int, int],
                   tensor: torch.Tensor) -> None:
        """Keep a shard (this rank's part of it) until its parameter has all of them,
        then assemble it: shards concatenated along the output rows, experts (a 3-D
        parameter) stacked."""
        param = self.params.get(target)
        if param is None:
            raise ValueError(f"unexpected weight {target!r} in checkpoint")
        shards = self.shards.setdefault(target, {})
        shards[key] = shard_piece(param, key[1], tensor)
        num_experts = param.shape[0] if param.dim() == 3 else 1
        if len(shards) < num_experts * per_expert:
            return
        dim = getattr(param, "output_dim", 0)
        rows = [torch.cat([shards[(e, s)] for s in range(per_expert)], dim=dim)
                for e in range(num_experts)]
        self._copy(target, torch.stack(rows) if param.dim() == 3 else rows[0], whole=False)
        del self.shards[target]

    def _copy(self, name: str, tensor: torch.Tensor, whole: bool = True) -> None:
        param = self.params.get(name)
        if param is None:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        if whole:  # as the checkpoint has it, not yet cut to this rank's part
            tensor = shard_piece(param, None, tensor)
        if param.shape != tensor.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        self.loaded.add(name)
