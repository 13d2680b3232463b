"""AWQ 4-bit checkpoints (AutoAWQ's "gemm" layout), read from their quantization_config:
bits (4 only), group_size (-1: one group over the input), zero_point (true only: the
layout always stores zero points), version ("gemm"; "gemv" packs differently)."""

from typing import Any

from engine.quantization.int4_linear import Int4Format, Int4Method


class AwqMethod(Int4Method):
    name = "awq"

    def __init__(self, config: dict[str, Any] | None) -> None:
        config = config or {}
        # AutoAWQ's own file says w_bit and q_group_size; Transformers' copy bits and group_size.
        bits = config.get("bits", config.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"awq checkpoints with bits={bits} are not supported: only 4-bit")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq version {version!r} is not supported: only the 'gemm' layout")
        if not config.get("zero_point", True):
            raise ValueError("awq checkpoints with zero_point=false are not supported")
        group_size = config.get("group_size", config.get("q_group_size", 128))
        super().__init__(Int4Format(awq=True, group_size=group_size, zero_offset=0),
                         config.get("modules_to_not_convert"))
