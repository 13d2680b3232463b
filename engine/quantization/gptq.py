"""GPTQ 4-bit checkpoints (AutoGPTQ's layout), read from their quantization_config:
bits (4 only), group_size (-1: one group over the input), sym (either: the zero points
are stored in both cases), desc_act (either: act-order groups come from g_idx),
checkpoint_format ("gptq", which stores zero points minus one, or "gptq_v2")."""

from typing import Any

from engine.quantization.int4_linear import Int4Format, Int4Method

# checkpoint_format -> what is added to a stored zero point.
_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


class GptqMethod(Int4Method):
    name = "gptq"

    def __init__(self, config: dict[str, Any] | None) -> None:
        config = config or {}
        bits = config.get("bits", 4)
        if bits != 4:
            raise ValueError(f"gptq checkpoints with bits={bits} are not supported: only 4-bit")
        # AutoGPTQ says checkpoint_format; GPTQModel also format.
        fmt = config.get("checkpoint_format", config.get("format", "gptq"))
        if fmt not in _ZERO_OFFSETS:
            raise ValueError(f"gptq checkpoint_format {fmt!r} is not supported: "
                             f"{' or '.join(_ZERO_OFFSETS)}")
        if config.get("lm_head"):
            raise ValueError("gptq checkpoints with a quantized lm_head are not supported")
        group_size = config.get("group_size", 128)
        super().__init__(Int4Format(awq=False, group_size=group_size,
                                    zero_offset=_ZERO_OFFSETS[fmt]),
                         config.get("modules_to_not_convert"))
