"""pagedq's inference engine: paged KV cache, continuous batching, torch only."""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.sampling_params import BeamSearchParams, SamplingParams
from engine.sequence import RequestMetrics

__all__ = [
    "LLM", "BeamSearchParams", "CompletionOutput", "EngineConfig", "EngineStats", "LLMEngine",
    "RequestMetrics", "RequestOutput", "SamplingParams",
]
