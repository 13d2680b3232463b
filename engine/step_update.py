"""After the forward: the scheduler moves sequences past the computed tokens, forks
samples and beams, and applies the step's tokens (`update_from_output`), ending the
sequences that stop and giving their blocks back.

A mixin of `Scheduler`, which owns the state it changes (its block manager, sequence
factory, stop checker and counters).
"""

from engine.beam_search import BeamStep
from engine.block_manager import BlockManager
from engine.logprob import Logprob
from engine.sampler import SampleResult
from engine.scheduler_output import SamplePlan, ScheduledSeq, StepResult
from engine.seq_factory import SequenceFactory
from engine.sequence import Sequence, SequenceGroup, SequenceStatus
from engine.stop_checker import StopChecker


class StepUpdates:
    bm: BlockManager
    factory: SequenceFactory
    stop_checker: StopChecker
    _fork_copies: list[tuple[int, int]]
    num_generated_tokens: int
    num_prompt_tokens: int

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        """End one sequence of a running request and give its blocks back."""
        self.bm.free(seq)
        seq.status = status

    def advance(self, scheduled: list[ScheduledSeq]) -> None:
        """The model has computed the step's tokens: move each sequence past them."""
        for entry in scheduled:
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:  # aborted or restarted this step
                continue
            before = seq.num_computed_tokens
            seq.num_computed_tokens = after = before + entry.num_tokens
            if before < seq.prompt_len:
                self.num_prompt_tokens += min(after, seq.prompt_len) - before
            self.bm.free_behind_window(seq)

    def fork_samples(self, group: SequenceGroup, seq: Sequence) -> list[Sequence]:
        """After the prompt, a request with n > 1 forks into n sequences sharing its blocks."""
        if group.params.n == 1 or len(group.seqs) > 1:
            return [seq]
        group.seqs.extend(self._fork(group, seq, i) for i in range(1, group.params.n))
        return group.seqs

    def _fork(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        child = self.factory.clone(group, parent, index)
        self.bm.fork(parent, child, self._fork_copies)
        return child

    def update_from_output(self, plans: list[SamplePlan], results: dict[str, StepResult],
                           now: float) -> tuple[list[SequenceGroup],
                                                list[tuple[SequenceGroup, Exception]]]:
        """Give each planned request its tokens (or next beams); end the sequences that
        stop. Returns the requests updated, and those whose update raised."""
        updated: list[SequenceGroup] = []
        failed: list[tuple[SequenceGroup, Exception]] = []
        for plan in plans:
            group = plan.group
            result = results.get(group.request_id)
            if result is None:
                continue
            try:
                self._apply(plan, result, now)
            except Exception as exc:
                failed.append((group, exc))
                continue
            updated.append(group)
        return updated, failed

    def _apply(self, plan: SamplePlan, result: StepResult, now: float) -> None:
        group = plan.group
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        if isinstance(result, BeamStep):
            self._step_beams(group, result)
            self.num_generated_tokens += len(group.seqs)
            return
        params, check = group.params, self.stop_checker.check
        want_logprobs = params.logprobs is not None
        for seq, res in zip(plan.seqs, result, strict=True):
            token = res.token_id
            matcher = seq.matcher
            if matcher is not None and not matcher.accept_token(token):
                raise RuntimeError(f"the grammar rejects token {token} it was masked to allow")
            seq.token_ids.append(token)
            if want_logprobs:
                seq.cumulative_logprob += res.logprob
                seq.logprobs.append(_position_logprobs(res))
            status, reason = check(seq, params, token)
            if status is None and matcher is not None and matcher.is_terminated():
                status = SequenceStatus.FINISHED_STOPPED  # the structure is complete
            if status is not None:
                self.finish_seq(seq, status)
                seq.stop_reason = reason
        self.num_generated_tokens += len(plan.seqs)

    def _step_beams(self, group: SequenceGroup, step: BeamStep) -> None:
        """Replace the group's beams by the next ones: reuse a parent for its first
        continuation, fork it for the others, free the parents nobody continues."""
        beams = group.seqs
        group.beam.apply(step)
        taken: set[int] = set()
        new_beams = []
        for i, cand in enumerate(step.beams):
            parent = beams[cand.parent]
            beam = self._fork(group, parent, i) if cand.parent in taken else parent
            taken.add(cand.parent)
            new_beams.append(beam)
        for i, (beam, cand) in enumerate(zip(new_beams, step.beams, strict=True)):
            beam.index = i
            beam.token_ids.append(cand.token_id)
            beam.cumulative_logprob = cand.cumulative_logprob
        for i, beam in enumerate(beams):
            if i not in taken:
                self.finish_seq(beam, SequenceStatus.FINISHED_STOPPED)
        group.seqs = new_beams


def _position_logprobs(res: SampleResult) -> dict[int, Logprob]:
    """The top tokens (ranks 1..k) and the chosen one, at one position."""
    logprobs = {token: Logprob(value, rank)
                for rank, (token, value) in enumerate((res.top_logprobs or {}).items(), 1)}
    # The chosen token may sit beside the top ones without being one of them.
    logprobs[res.token_id] = Logprob(res.logprob, res.rank)
    return logprobs
