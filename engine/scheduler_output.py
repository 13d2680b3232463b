"""What one scheduled step is: the sequences it computes, the block moves it needs, and
which sequences take which logits row afterwards."""

from dataclasses import dataclass, field

from engine.beam_search import BeamStep
from engine.sampler import SampleResult
from engine.sequence import Sequence, SequenceGroup


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    group: SequenceGroup
    num_tokens: int


@dataclass(slots=True)
class SamplePlan:
    """The sequences of one request that get a token this step, and their logits rows.

    Beams are listed in the group's order; samples of a request forked this step all
    read their parent's row.
    """

    group: SequenceGroup
    seqs: list[Sequence]
    rows: list[int]


StepResult = list[SampleResult] | BeamStep


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # Copies for the forks of the last step: run before any block moves this step.
    fork_copies: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: dict[int, int] = field(default_factory=dict)
    blocks_to_swap_in: dict[int, int] = field(default_factory=dict)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    # Requests that can never run (too big for the pool, or their grammar failed to
    # compile), each with its abort_reason: the engine aborts them.
    never_fit: list[SequenceGroup] = field(default_factory=list)
    # Waiting requests passed over because their grammar is still compiling.
    compiling: list[SequenceGroup] = field(default_factory=list)
    # Sequences (by id) whose block table changed since the last step was scheduled.
    changed_tables: dict[int, Sequence] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)
