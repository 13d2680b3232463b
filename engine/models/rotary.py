"""Rotary position embeddings: cos/sin tables for every position, built once.

Every RoPE variant pagedq reads differs only in its inverse frequencies and a
scale on cos/sin; Transformers' own init functions compute those, so the tables
match its models bit for bit.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0 .. max_len - 1 of one set of RoPE parameters.

    `layer_type` names the parameter set of a model that keeps one per kind of layer
    (Gemma 3: a separate base for its sliding-window layers).
    """

    def __init__(self, config: PretrainedConfig, head_dim: int, max_len: int,
                 layer_type: str | None = None) -> None:
        super().__init__()
        rope = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
        rope_type = rope.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; pagedq supports "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        # Computed on the CPU even when the model is being built on the meta device.
        with torch.device("cpu"):
            if rope_type == "default":
                exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
                inv_freq, scaling = 1.0 / (rope["rope_theta"] ** exponent), 1.0
            else:
                extra = {} if layer_type is None else {"layer_type": layer_type}
                if rope_type == "longrope":
                    # Transformers switches to the long factors once a forward's sequence
                    # outgrows original_max_position_embeddings, which would leave cached
                    # keys rotated by the other set; like vLLM, pagedq picks one set for
                    # the engine's life by max_model_len.
                    extra["seq_len"] = max_len
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](
                    config, torch.device("cpu"), **extra)
            freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            # rotate_half(x) * sin == roll(x, half) * sin with the first half of sin
            # negated: one roll instead of two slices, a negation and a concatenation.
            sign = torch.ones(rotary_dim)
            sign[: rotary_dim // 2] = -1.0
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling * sign, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's cos/sin rows, [num_tokens, 1, rotary_dim]; shared by every layer."""
        return (self.cos[positions].to(dtype).unsqueeze(1),
                self.sin[positions].to(dtype).unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transformers' `x * cos + rotate_half(x) * sin`, bit for bit; with partial
    rotary (Phi-4-mini), only the first rotary_dim features of each head turn."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + x.roll(rotary_dim // 2, dims=-1) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rot.roll(rotary_dim // 2, dims=-1) * sin, rest), dim=-1)
