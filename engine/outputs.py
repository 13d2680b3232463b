"""What the engine hands back: per-request outputs and engine-wide statistics."""

from dataclasses import dataclass

from engine.sequence import RequestMetrics


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    score: float | None = None  # beam search: cumulative_logprob / length ** length_penalty


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    abort_reason: str | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    device_blocks_total: int
    device_blocks_free: int
    swap_blocks_total: int
    swap_blocks_free: int
    num_preemptions: int
    num_swapped_out_blocks: int
    num_swapped_in_blocks: int
    num_cow_copies: int
    prefix_cache_hit_rate: float
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    peak_num_running: int = 0
    peak_device_blocks_used: int = 0
    num_steps: int = 0
