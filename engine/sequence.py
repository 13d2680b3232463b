"""Sequences and the requests (sequence groups) that own them.

A sequence is one token stream with its block table. A request holds one
sequence while its prompt is prefilled; parallel sampling and beam search fork
it into several that share their common blocks.
"""

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.logprob import Logprob
from engine.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher

    from engine.beam_search import BeamState
    from engine.structured_output import Grammar


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    SWAPPED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        # Identity tests: hashing an enum member runs Python code, and this is hot.
        return (self is SequenceStatus.FINISHED_STOPPED or self is SequenceStatus.FINISHED_LENGTH
                or self is SequenceStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class Detokenizer:
    """Incremental detokenization state: text is emitted only once it is stable.

    Decoding a window that starts a few tokens back keeps the spacing that
    depends on the previous token; a trailing U+FFFD means a multi-byte
    character is still incomplete, so nothing is emitted yet.
    """

    prefix_offset: int
    read_offset: int
    text: str = ""


@dataclass(slots=True)
class Sequence:
    seq_id: int
    token_ids: list[int]
    prompt_len: int
    generator: torch.Generator | None = None
    index: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    detok: Detokenizer | None = None
    stop_reason: int | str | None = None
    # Where the sequence stands in its request's grammar (structured output), if any.
    matcher: "GrammarMatcher | None" = None
    # What earlier outputs reported (RequestOutputKind.DELTA reports only the rest).
    num_reported_tokens: int = 0
    num_reported_chars: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def text(self) -> str:
        return self.detok.text if self.detok else ""


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.time()) and token counts of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    num_swapped_out_blocks: int = 0
    num_swapped_in_blocks: int = 0
    num_recomputed_tokens: int = 0


@dataclass(slots=True)
class SequenceGroup:
    """One request: its prompt, parameters and live sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | BeamSearchParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    priority: int = 0
    deadline: float | None = None
    seed: int = 0
    abort_reason: str | None = None
    beam: "BeamState | None" = None
    # Prompt token i -> its logprobs (SamplingParams.prompt_logprobs); [None] + one a token.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # The compiled (or compiling) grammar of a request with structured output.
    grammar: "Grammar | None" = None
    # Time spent waiting (queued or preempted) before the current stretch, and when that
    # stretch began (None while running): what priority aging counts.
    waited_s: float = 0.0
    queued_since: float | None = None

    @property
    def arrival_time(self) -> float:
        return self.metrics.arrival_time

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.status.finished]

    @property
    def is_finished(self) -> bool:
        return all(s.status.finished for s in self.seqs)
