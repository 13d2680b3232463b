"""What the engine hands back: per-request outputs and engine-wide statistics."""

from collections.abc import Callable
from dataclasses import dataclass

from engine.sequence import RequestMetrics, SequenceGroup


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


def completions(group: SequenceGroup, decode: Callable[[list[int]], str]
                ) -> list[CompletionOutput]:
    """A request's completions: its finished beams by score, or its sequences by index."""
    if group.beam is not None and group.beam.done:
        return [
            CompletionOutput(i, decode(h.token_ids), h.token_ids, h.cumulative_logprob,
                             None, "stop" if h.stopped else "length", score=h.score)
            for i, h in enumerate(group.beam.finished)
        ]
    want_logprobs = getattr(group.params, "logprobs", None) is not None
    return [
        CompletionOutput(
            index=s.index,
            text=s.text if s.detok or group.beam is None else decode(s.output_token_ids),
            token_ids=s.output_token_ids,
            cumulative_logprob=s.cumulative_logprob,
            logprobs=s.logprobs if want_logprobs else None,
            finish_reason=s.status.finish_reason,
            stop_reason=s.stop_reason,
        )
        for s in sorted(group.seqs, key=lambda s: s.index)
    ]
