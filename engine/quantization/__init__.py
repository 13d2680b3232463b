"""Quantized weights: which method a model loads with, and the contract each follows.

`resolve_quantization` reads what was asked (`EngineConfig.quantization`) against what
the checkpoint says (`quantization_config.quant_method`) and returns the method's
object, or None for plain float weights. A method acts twice while the model loads:
`prepare` (on the meta device, before the checkpoint is read) swaps the linears it
quantizes for modules holding the checkpoint's own tensors; `finish` (after) turns
what was loaded into what runs: float weights quantized at load, packed layouts
repacked. Only the decoder layers' projections are quantized; embeddings, the LM
head, norms and MoE routers stay in the model's dtype.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from importlib import import_module
from typing import Any

from torch import nn
from transformers import PretrainedConfig

# name -> "module:class"; each class takes the checkpoint's quantization_config (a
# dict), or None when float weights are to be quantized at load.
_METHODS = {
    "fp8": "engine.quantization.fp8:Fp8Method",
    "int8": "engine.quantization.int8:Int8Method",
    "awq": "engine.quantization.awq:AwqMethod",
    "gptq": "engine.quantization.gptq:GptqMethod",
}


class QuantMethod(ABC):
    name: str

    @abstractmethod
    def prepare(self, model: nn.Module) -> None:
        """Before loading, on the meta device: replace the linears the checkpoint holds
        quantized (a float checkpoint quantized at load has none to replace)."""

    @abstractmethod
    def finish(self, model: nn.Module) -> None:
        """After loading, on the model's device: the linears as they will run."""


def quantized_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) of every projection a method quantizes: the
    decoder layers' linears, not a mixture's router."""
    for name, parent in list(model.named_modules()):
        if not name.startswith("layers."):
            continue
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (name.endswith(".mlp")
                                                     and child_name == "gate"):
                yield parent, child_name, child


def checkpoint_method(hf_config: PretrainedConfig) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint's quant_method and its quantization_config, if it has one."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None, {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc.get("quant_method"), qc


def resolve_quantization(requested: str | None, hf_config: PretrainedConfig
                         ) -> QuantMethod | None:
    found, qc = checkpoint_method(hf_config)
    if found is not None and found not in _METHODS:
        raise ValueError(f"the checkpoint is quantized with {found!r}, which pagedq does not "
                         f"load; supported: {', '.join(_METHODS)}")
    if found is not None and requested is not None and requested != found:
        raise ValueError(f"quantization {requested!r} was asked for, but the checkpoint is "
                         f"quantized with {found!r}: leave quantization unset or give "
                         f"{found!r}")
    if found is None and requested in ("awq", "gptq"):
        raise ValueError(f"quantization {requested!r} needs a checkpoint quantized with it "
                         "(its config.json has no quantization_config)")
    name = found or requested
    if name is None:
        return None
    module, cls = _METHODS[name].split(":")
    return getattr(import_module(module), cls)(qc or None)
