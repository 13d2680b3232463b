"""Iteration-level scheduling: which tokens of which sequences run in the next step.

Each step spends a token budget (`max_num_batched_tokens`) on, in order: the
running requests (a decode token each, or the next chunk of a prompt), the
swapped requests that fit back, then waiting requests. Prefill chunks and
decodes share one step. When the device pool cannot hold the step, the least
important running request is preempted: swapped to the CPU pool, or, when that
is full or `preemption_mode="recompute"`, freed and requeued for recompute.

Importance (`engine/importance.py`) is the priority, lower first, aged by waiting, then
arrival. A queued request more important than a running
one is not kept out by it: when it would not fit, the less important running requests
are preempted to make room, and swapped and waiting requests come back most
important first, whichever queue they are in.

The scheduler owns the block manager: it is the one to give sequences blocks, fork
them (samples, beams) and free them, and it applies each step's tokens
(`update_from_output`, in `engine/step_update.py`; the step's records are in
`engine/scheduler_output.py`).
"""

import time
from collections import deque

from engine.block_manager import BlockManager, CachedPrefix
from engine.block_needs import BlockNeeds
from engine.config import EngineConfig
from engine.importance import Importance
from engine.scheduler_output import ScheduledSeq, SchedulerOutput
from engine.seq_factory import SequenceFactory
from engine.sequence import Sequence, SequenceGroup, SequenceStatus
from engine.step_update import StepUpdates
from engine.stop_checker import StopChecker


class Scheduler(StepUpdates, BlockNeeds):
    def __init__(self, config: EngineConfig, num_device_blocks: int, num_cpu_blocks: int,
                 factory: SequenceFactory, stop_checker: StopChecker,
                 window: int | None = None) -> None:
        """`window`: the attention window every layer of the model shares (None when
        any layer is global); blocks behind it are freed as sequences move on."""
        self.config = config
        self.bm = BlockManager(config.block_size, num_device_blocks, num_cpu_blocks,
                               config.enable_prefix_caching, config.share_blocks, window)
        self.factory = factory
        self.importance = Importance(config.priority_aging_s)
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
        self.importance.enqueue(self.waiting, group, time.time())


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
        now = time.time()
        if not self._running_sorted:
            self.running.sort(key=lambda g: self.importance.key(g, now))
            self._running_sorted = True
        self._preempt_for_priority(out, now)
        made_room = len(out.preempted)
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
        # Resuming or admitting right after a preemption for lack of room would thrash.
        if len(out.preempted) == made_room:
            budget, num_seqs = self._resume_swapped(out, budget, num_seqs, now)
            self._admit_waiting(out, budget, num_seqs, now)
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
            self.importance.enqueue(self.swapped, group, time.time())
            return
        for seq in seqs:
            group.metrics.num_recomputed_tokens += seq.num_computed_tokens
        self._requeue(group)

    def _requeue(self, group: SequenceGroup) -> None:
        for seq in group.live_seqs():
            self.bm.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        self.importance.enqueue(self.waiting, group, time.time())

    def _resume_swapped(self, out: SchedulerOutput, budget: int, num_seqs: int,
                        now: float) -> tuple[int, int]:
        """Bring swapped requests back, most important first, as soon as their blocks
        fit, until a waiting request is more important than the next one."""
        waiting = self._first_ready_waiting()
        while self.swapped and budget > 0:
            group = self.swapped[0]
            if waiting is not None and self.importance.before(waiting, group, now):
                break
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
            self.importance.dequeued(group, now)
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

    def _admit_waiting(self, out: SchedulerOutput, budget: int, num_seqs: int,
                       now: float) -> None:
        """Admit waiting requests in order while they fit and no swapped request is more
        important; one whose grammar is still compiling keeps its place, and those
        behind it are admitted past it."""
        compiling: list[SequenceGroup] = []
        while self.waiting and budget > 0:
            group = self.waiting[0]
            if self.swapped and self.importance.before(self.swapped[0], group, now):
                break
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
            self.importance.dequeued(group, now)
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

    def _first_ready_waiting(self) -> SequenceGroup | None:
        """The first waiting request that could start now (its grammar, if any, ready)."""
        for group in self.waiting:
            if group.grammar is None or group.grammar.ready:
                return group
        return None

    def _preempt_for_priority(self, out: SchedulerOutput, now: float) -> None:
        """The most important queued request would not fit, but less important ones run:
        preempt those, least important first, until it fits (it starts this step or the
        next). Only a lower priority value preempts (equals never churn each other), and
        only a request it also outranks once aging is counted (a long-waited request is
        not pushed back out); victims never preempt it back."""
        candidates = [g for g in (self.swapped[0] if self.swapped else None,
                                  self._first_ready_waiting()) if g is not None]
        if not candidates:
            return
        group = min(candidates, key=lambda g: self.importance.key(g, now))
        # The priority test first: it is cheap, and most steps stop there (the fit
        # test looks the prompt up in the prefix cache).
        while self.running:
            victim = self.running[-1]
            if not (group.priority < victim.priority
                    and self.importance.before(group, victim, now)) or self._fits(group):
                return
            self._preempt(victim, out)

    def _fits(self, group: SequenceGroup) -> bool:
        """Whether a queued request's sequences and first step fit beside the running
        ones (one bigger than the whole pool counts as fitting: admission aborts it)."""
        seqs = group.live_seqs()
        if self.num_running_seqs() + len(seqs) > self.config.max_num_seqs:
            return False
        if seqs[0].status is SequenceStatus.SWAPPED:
            return self.bm.can_swap_in(group, len(seqs))
        if self._min_blocks(group) > self.bm.device.num_blocks:
            return True
        prefix = (CachedPrefix() if getattr(group.params, "prompt_logprobs", None) is not None
                  else self.bm.find_cached_prefix(seqs[0]))
        need = self._admission_blocks(group, prefix, self.config.max_num_batched_tokens)
        return need is not None and need <= self.bm.device.num_free

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
