"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Each step spends a token budget (`max_num_batched_tokens`) on, in order: the
running requests (a decode token each, or the next chunk of a prompt), the
swapped requests that fit back, then waiting requests. Prefill chunks and
decodes share one step. When the device pool cannot hold the step, the least
important running request is preempted: swapped to the CPU pool, or, when that
is full or `preemption_mode="recompute"`, freed and requeued for recompute.

The scheduler owns the block manager: it is the one to give sequences blocks, fork
them (samples, beams) and free them, and it applies each step's tokens
(`update_from_output`).
"""

import time
from collections import deque
from dataclasses import dataclass, field

from engine.beam_search import BeamStep
from engine.block_manager import BlockManager, CachedPrefix
from engine.config import EngineConfig
from engine.logprob import Logprob
from engine.sampler import SampleResult
from engine.seq_factory import SequenceFactory
from engine.sequence import Sequence, SequenceGroup, SequenceStatus
from engine.stop_checker import StopChecker


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


class Scheduler:
    def __init__(self, config: EngineConfig, num_device_blocks: int, num_cpu_blocks: int,
                 factory: SequenceFactory, stop_checker: StopChecker) -> None:
        self.config = config
        self.bm = BlockManager(config.block_size, num_device_blocks, num_cpu_blocks,
                               config.enable_prefix_caching, config.share_blocks)
        self.factory = factory
        self.stop_checker = stop_checker
        self._fork_copies: list[tuple[int, int]] = []
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self._running_sorted = True  # in preemption order; appends may break it
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = 0
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0

    # ---- queues -------------------------------------------------------------

    def add(self, group: SequenceGroup) -> None:
        self._enqueue(self.waiting, group)

    @staticmethod
    def _enqueue(queue: deque[SequenceGroup], group: SequenceGroup) -> None:
        """Insert in (priority, arrival) order; the common case appends at the tail."""
        key = group.preemption_key
        i = len(queue)
        while i and queue[i - 1].preemption_key > key:
            i -= 1
        queue.insert(i, group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_running_seqs(self) -> int:
        return sum(len(g.live_seqs()) for g in self.running)

    def remove(self, group: SequenceGroup) -> None:
        """Take a finished or aborted request out of its queue and free all its blocks."""
        for queue in (self.running, self.waiting, self.swapped):
            if group in queue:
                queue.remove(group)
        for seq in group.seqs:
            self.bm.free(seq)

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        """End one sequence of a running request and give its blocks back."""
        self.bm.free(seq)
        seq.status = status

    def drop_unwritten(self, blocks: set[int], readers: list[SequenceGroup]) -> None:
        """A failed forward left `blocks` unwritten: take them out of the prefix cache, and
        send the requests that read them back to the waiting queue with nothing computed
        (unlike a preemption, this costs them nothing else)."""
        self.bm.uncache(blocks)
        for group in readers:
            if group in self.running:
                self.running.remove(group)
            self._requeue(group)

    def first_in_line(self) -> SequenceGroup | None:
        """The request the next step serves first: running, then swapped, then waiting."""
        for queue in (self.running, self.swapped, self.waiting):
            if queue:
                return queue[0]
        return None

    # ---- one step -------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(fork_copies=self._fork_copies)
        self._fork_copies = []
        budget = self.config.max_num_batched_tokens
        num_seqs = 0
        if not self._running_sorted:
            self.running.sort(key=lambda g: g.preemption_key)
            self._running_sorted = True
        i = 0
        while i < len(self.running) and budget > 0:
            group = self.running[i]
            plan = self._plan_tokens(group, budget)
            if plan:
                if not self._make_room(group, plan, out):
                    break
                budget -= self._commit(group, plan, out)
                num_seqs += len(plan)
            i += 1
        # Resuming or admitting right after a preemption would only thrash.
        if not out.preempted:
            budget, num_seqs = self._resume_swapped(out, budget, num_seqs)
            if not self.swapped:
                self._admit_waiting(out, budget, num_seqs)
        out.changed_tables = self.bm.take_changed()
        return out

    def _plan_tokens(self, group: SequenceGroup, budget: int) -> list[tuple[Sequence, int]]:
        if len(group.seqs) == 1:  # the common case, kept short: one live sequence
            seq = group.seqs[0]
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            return [(seq, n)] if n > 0 else []
        seqs = group.live_seqs()
        if len(seqs) > 1 and any(not s.block_table for s in seqs):
            seqs = self._recompute_shared(seqs)
            if len(seqs) == 1:
                return [(seqs[0], min(seqs[0].num_uncomputed_tokens - 1, budget))]
        takes = self._split_budget([s.num_uncomputed_tokens for s in seqs], budget)
        return [(seq, n) for seq, n in zip(seqs, takes, strict=True) if n > 0]

    @staticmethod
    def _split_budget(needs: list[int], budget: int) -> list[int]:
        """Tokens each of a group's sequences computes this step, given what each needs."""
        if sum(needs) <= budget:
            return needs
        if len(needs) == 1:
            return [budget]
        # Several sequences (samples or beams) must reach their last token in the same
        # step to be sampled together, so a partial plan keeps one token back on each.
        takes = []
        for need in needs:
            take = max(min(need - 1, budget), 0)
            takes.append(take)
            budget -= take
        return takes

    def _recompute_shared(self, seqs: list[Sequence]) -> list[Sequence]:
        """Re-prefill a recomputed sample or beam group sharing what its sequences share.

        The first sequence is recomputed alone up to its last token; then each sibling
        adopts the full blocks they have in common and computes only the rest. This keeps
        the group within the blocks it held before preemption, cache hits or not.
        """
        leader = seqs[0]
        if leader.num_uncomputed_tokens > 1:
            return [leader]
        for seq in seqs[1:]:
            if not seq.block_table:
                self.bm.adopt_prefix(leader, seq)
        return seqs

    def _blocks_needed(self, plan: list[tuple[Sequence, int]]) -> int:
        if len(plan) == 1:
            return self.bm.num_new_blocks(*plan[0])
        return sum(self.bm.num_new_blocks(seq, n) for seq, n in plan)

    def _make_room(self, group: SequenceGroup, plan: list[tuple[Sequence, int]],
                   out: SchedulerOutput) -> bool:
        """Preempt less important requests until `plan` fits; False if `group` itself went."""
        while self._blocks_needed(plan) > self.bm.device.num_free:
            victim = self.running[-1]
            if victim is group and len(self.running) == 1:
                self.running.remove(group)
                self._never_fits(group, out)
                return False
            self._preempt(victim, out)
            if victim is group:
                return False
        return True

    def _never_fits(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """Alone in the pool and still too big: it can never run, so it is aborted."""
        for seq in group.live_seqs():
            self.bm.free(seq)  # now, so the rest of this step can use the blocks
        need = self._min_blocks(group)
        group.abort_reason = (
            f"request needs {need} KV blocks of {self.bm.block_size} tokens but the device "
            f"pool holds {self.bm.device.num_blocks}; raise num_device_blocks or shorten it"
        )
        out.never_fit.append(group)

    def _commit(self, group: SequenceGroup, plan: list[tuple[Sequence, int]],
                out: SchedulerOutput) -> int:
        bm, bs, total = self.bm, self.bm.block_size, 0
        for seq, n in plan:
            bm.allocate_slots(seq, n, out.blocks_to_copy)
            if (seq.num_computed_tokens + n) // bs > seq.num_computed_tokens // bs:
                bm.cache_full_blocks(seq, n)  # only when the step fills a block
            out.scheduled.append(ScheduledSeq(seq, group, n))
            total += n
        if group.metrics.first_scheduled_time is None:
            group.metrics.first_scheduled_time = time.time()
        return total

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        self.running.remove(group)
        out.preempted.append(group)
        self.num_preemptions += 1
        group.metrics.num_preemptions += 1
        # A group still re-prefilling its siblings (see _recompute_shared) is recomputed
        # again: its swapped-out siblings could not adopt the leader's blocks.
        seqs = group.live_seqs()
        swap = self.config.preemption_mode == "swap" and all(s.block_table for s in seqs)
        if swap and self.bm.can_swap_out(group):
            # Blocks another victim already moved this step (a shared prefix) are reused.
            mapping = self.bm.swap_out(group, out.blocks_to_swap_out)
            out.blocks_to_swap_out.update(mapping)
            self.num_swapped_out_blocks += len(mapping)
            group.metrics.num_swapped_out_blocks += len(mapping)
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
            return
        for seq in seqs:
            group.metrics.num_recomputed_tokens += seq.num_computed_tokens
        self._requeue(group)

    def _requeue(self, group: SequenceGroup) -> None:
        for seq in group.live_seqs():
            self.bm.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        self._enqueue(self.waiting, group)

    def _resume_swapped(self, out: SchedulerOutput, budget: int, num_seqs: int) -> tuple[int, int]:
        """Bring swapped requests back, oldest first, as soon as their blocks fit."""
        while self.swapped and budget > 0:
            group = self.swapped[0]
            seqs = group.live_seqs()
            if num_seqs + len(seqs) > self.config.max_num_seqs:
                break
            plan = self._plan_tokens(group, budget)
            reserve = self._swap_in_reserve(plan)
            if not plan or not self.bm.can_swap_in(group, reserve):
                # Alone with the whole pool and still too big: waiting would hang everyone.
                if self.bm.device.num_free == self.bm.device.num_blocks:
                    self.swapped.popleft()
                    self._never_fits(group, out)
                    continue
                break
            self.swapped.popleft()
            mapping = self.bm.swap_in(group, out.blocks_to_swap_in)
            out.blocks_to_swap_in.update(mapping)
            self.num_swapped_in_blocks += len(mapping)
            group.metrics.num_swapped_in_blocks += len(mapping)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            self._running_sorted = False
            budget -= self._commit(group, plan, out)
            num_seqs += len(plan)
        return budget, num_seqs

    def _swap_in_reserve(self, plan: list[tuple[Sequence, int]]) -> int:
        """Blocks a resumed group needs beyond its own: new blocks for the step, and
        k - 1 copies of a partly filled block that k of its sequences will write."""
        bs = self.bm.block_size
        new = sum(max(self.bm.blocks_for(s.num_computed_tokens + n) - len(s.block_table), 0)
                  for s, n in plan)
        written = [s.block_table[s.num_computed_tokens // bs] for s, _ in plan
                   if s.num_computed_tokens % bs]
        return new + len(written) - len(set(written))

    def _min_blocks(self, group: SequenceGroup) -> int:
        """The fewest blocks the group's sequences need: the prompt's full blocks once."""
        seqs = group.live_seqs()
        shared = group.seqs[0].prompt_len // self.bm.block_size if len(seqs) > 1 else 0
        return shared + sum(self.bm.blocks_for(s.num_tokens) - shared for s in seqs)

    def _admit_waiting(self, out: SchedulerOutput, budget: int, num_seqs: int) -> None:
        """Admit waiting requests in order while they fit; one whose grammar is still
        compiling keeps its place, and those behind it are admitted past it."""
        compiling: list[SequenceGroup] = []
        while self.waiting and budget > 0:
            group = self.waiting[0]
            if group.grammar is not None and not group.grammar.ready:
                compiling.append(self.waiting.popleft())
                continue
            if group.grammar is not None and not self._start_matchers(group, out):
                self.waiting.popleft()
                continue
            seqs = group.live_seqs()
            if num_seqs + len(seqs) > self.config.max_num_seqs:
                break
            if self._min_blocks(group) > self.bm.device.num_blocks:
                self.waiting.popleft()
                self._never_fits(group, out)
                continue
            # Only the first sequence looks up the cache: the siblings of a recomputed group
            # adopt its blocks (_recompute_shared).
            # A cached prefix has no logits: prompt logprobs need the whole prompt run.
            prefix = (CachedPrefix() if getattr(group.params, "prompt_logprobs", None) is not None
                      else self.bm.find_cached_prefix(seqs[0]))
            need = self._admission_blocks(group, prefix, budget)
            if need is None or need > self.bm.device.num_free:
                if self.bm.device.num_free == self.bm.device.num_blocks:
                    self.waiting.popleft()
                    self._never_fits(group, out)
                    continue
                break
            self.waiting.popleft()
            self.bm.allocate_prefix(seqs[0], prefix)
            group.metrics.num_cached_tokens = max(group.metrics.num_cached_tokens,
                                                  prefix.num_tokens)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            self._running_sorted = False
            plan = self._plan_tokens(group, budget)
            budget -= self._commit(group, plan, out)
            num_seqs += len(plan)
        self.waiting.extendleft(reversed(compiling))
        out.compiling = compiling

    def _start_matchers(self, group: SequenceGroup, out: SchedulerOutput) -> bool:
        """Give each sequence of a request whose grammar is compiled a matcher, unless it
        has one (a matcher follows its sequence through preemptions, as its tokens do).
        False, and the request in `out.never_fit`, when the grammar failed to compile."""
        grammar = group.grammar
        error = grammar.error()
        if error is not None:
            group.abort_reason = error
            out.never_fit.append(group)
            return False
        for seq in group.live_seqs():
            if seq.matcher is None:
                seq.matcher = grammar.new_matcher()
        return True

    def _admission_blocks(self, group: SequenceGroup, prefix: CachedPrefix,
                          budget: int) -> int | None:
        """Free device blocks a waiting group's first step uses, `prefix` included, found
        without taking anything (None: no token of it fits the budget).

        It is what _plan_tokens and _recompute_shared will plan once the prefix is taken,
        worked out for a group that holds no blocks: the first sequence starts after its
        cached prefix; when that leaves it one token, its siblings adopt what they share.
        """
        leader, *siblings = group.live_seqs()
        starts = [prefix.num_tokens]
        uncomputed = leader.num_tokens - prefix.num_tokens
        if siblings and uncomputed > 1:
            takes = [min(uncomputed - 1, budget)]
        else:
            bs = self.bm.block_size
            starts += [self.bm.count_shared_blocks(leader.token_ids, prefix.num_tokens, s) * bs
                       for s in siblings]
            seqs = [leader, *siblings]
            needs = [s.num_tokens - start for s, start in zip(seqs, starts, strict=True)]
            takes = self._split_budget(needs, budget)
        if not any(takes):
            return None
        # Every start is a whole number of blocks, all of them already held.
        new = sum(self.bm.blocks_for(start + n) - self.bm.blocks_for(start)
                  for start, n in zip(starts, takes, strict=True))
        return prefix.num_free_blocks + new

    # ---- after the forward ------------------------------------------------------

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
