"""pagedq's inference engine: paged KV cache, continuous batching, torch only.

Names are imported on first use, so that a producer which only validates
`SamplingParams` never pays for importing torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_HOMES = {
    "LLM": "engine.llm",
    "BeamSearchParams": "engine.sampling_params",
    "CompletionOutput": "engine.outputs",
    "EngineConfig": "engine.config",
    "EngineStats": "engine.outputs",
    "LLMEngine": "engine.llm_engine",
    "Logprob": "engine.logprob",
    "RequestMetrics": "engine.sequence",
    "RequestOutput": "engine.outputs",
    "RequestOutputKind": "engine.sampling_params",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.sampling_params",
}

__all__ = [
    "LLM", "BeamSearchParams", "CompletionOutput", "EngineConfig", "EngineStats", "LLMEngine",
    "Logprob", "RequestMetrics", "RequestOutput", "RequestOutputKind", "SamplingParams",
    "StructuredOutputsParams",
]

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.logprob import Logprob
    from engine.outputs import CompletionOutput, EngineStats, RequestOutput
    from engine.sampling_params import (
        BeamSearchParams,
        RequestOutputKind,
        SamplingParams,
        StructuredOutputsParams,
    )
    from engine.sequence import RequestMetrics


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
