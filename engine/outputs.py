"""What the engine hands back: per-request outputs and engine-wide statistics."""

from collections.abc import Callable
from dataclasses import dataclass

from engine.logprob import Logprob
from engine.sampling_params import RequestOutputKind
from engine.sequence import RequestMetrics, SequenceGroup


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # None unless logprobs were asked for (or beams)
    logprobs: list[dict[int, Logprob]] | None  # per generated token: token id -> Logprob
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
    # SamplingParams.prompt_logprobs: per prompt token, None for the first.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


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
    weight_bytes: int = 0              # the model's weights on the device (one rank's shard)


def completions(group: SequenceGroup, decode: Callable[[list[int], list[int]], str]
                ) -> list[CompletionOutput]:
    """A request's completions: its finished beams by score, or its sequences by index,
    whole or (RequestOutputKind.DELTA) what is new since the last report.

    `decode(prompt_token_ids, output_token_ids)` is the text of an output that is not
    decoded as it goes.
    """
    if group.beam is not None and group.beam.done:
        return [
            CompletionOutput(i, decode(group.prompt_token_ids, h.token_ids), h.token_ids,
                             h.cumulative_logprob, None, "stop" if h.stopped else "length",
                             score=h.score)
            for i, h in enumerate(group.beam.finished)
        ]
    params = group.params
    want_logprobs = getattr(params, "logprobs", None) is not None
    delta = getattr(params, "output_kind", None) is RequestOutputKind.DELTA
    # While running, text that could still turn into a stop string is held back.
    stops = getattr(params, "stop", None)
    held = max(map(len, stops)) - 1 if stops else 0
    seqs = group.seqs if len(group.seqs) == 1 else sorted(group.seqs, key=lambda s: s.index)
    outs = []
    for s in seqs:
        # Copies: an output handed out earlier must not grow with the sequence.
        tokens, logprobs = s.output_token_ids, list(s.logprobs) if want_logprobs else None
        if logprobs:
            decode_tokens(logprobs[s.num_reported_tokens:], decode)
        text = s.text if s.detok else decode(group.prompt_token_ids, tokens)
        if held and not s.status.finished:
            text = text[:max(len(text) - held, s.num_reported_chars)]
        if delta:
            text, tokens = text[s.num_reported_chars:], tokens[s.num_reported_tokens:]
            logprobs = logprobs[s.num_reported_tokens:] if logprobs is not None else None
            s.num_reported_chars += len(text)
            s.num_reported_tokens += len(tokens)
        outs.append(CompletionOutput(
            index=s.index, text=text, token_ids=tokens,
            cumulative_logprob=s.cumulative_logprob if want_logprobs or group.beam else None,
            logprobs=logprobs, finish_reason=s.status.finish_reason,
            stop_reason=s.stop_reason))
    return outs


def decode_tokens(positions: list[dict[int, Logprob] | None],
                  decode: Callable[[list[int], list[int]], str]) -> None:
    """Give each token of these positions its text, once."""
    for position in positions:
        for token, logprob in (position or {}).items():
            if logprob.decoded_token is None:
                logprob.decoded_token = decode([], [token])
