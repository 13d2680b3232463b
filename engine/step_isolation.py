"""Keep one failing request from failing a step: the step's pure phases, and bisection.

After scheduling, a step runs the model, gives each sequence its logits row
(forking requests with n > 1), computes every request's next tokens, then
applies them. Running the model and computing tokens change no engine state
(the forward writes the same KV slots when run again; sampling draws random
numbers only once nothing can fail), so when one of them raises, it is run
again on halves of the requests, in scheduled order, until each failure is
pinned on one request. The engine aborts those and applies the rest.
"""

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from engine.model_runner import StepLogits
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from engine.scheduler_output import SamplePlan, ScheduledSeq, StepResult
from engine.sequence import SequenceGroup, SequenceStatus
from engine.structured_output import fill_token_masks

T = TypeVar("T")
R = TypeVar("R")


def bisect_failures(items: list[T], attempt: Callable[[list[T]], R], error: Exception
                    ) -> tuple[list[R], list[tuple[T, Exception]]]:
    """`attempt(items)` raised `error`: run it on halves, in order, down to single items.

    Returns the results of the parts that ran and each failing item with its error.
    The order matters: a request may read prefix blocks that an earlier one writes.
    """
    if len(items) == 1:
        return [], [(items[0], error)]
    results: list[R] = []
    failed: list[tuple[T, Exception]] = []
    mid = len(items) // 2
    for part in (items[:mid], items[mid:]):
        try:
            results.append(attempt(part))
        except Exception as exc:
            part_results, part_failed = bisect_failures(part, attempt, exc)
            results += part_results
            failed += part_failed
    return results, failed


def groups_in_order(scheduled: list[ScheduledSeq]) -> list[SequenceGroup]:
    return list({id(e.group): e.group for e in scheduled}.values())


def entries_of(scheduled: list[ScheduledSeq], groups: list[SequenceGroup]
               ) -> list[ScheduledSeq]:
    ids = {id(g) for g in groups}
    return [e for e in scheduled if id(e.group) in ids]


def lost_blocks(scheduled: list[ScheduledSeq], failed: list[SequenceGroup], block_size: int
                ) -> tuple[set[int], list[SequenceGroup]]:
    """The blocks whose KV this step leaves unwritten or wrong, and the readers to redo.

    A failed group's blocks for this step were never (fully) written; a group admitted
    this step may have reused them from the prefix cache, and then what it writes
    depends on them too. Readers always come after their writers in scheduled order.
    """
    bad = {id(g) for g in failed}
    lost = {b for e in scheduled if id(e.group) in bad for b in _written(e, block_size)}
    readers: list[SequenceGroup] = []
    for group in groups_in_order(scheduled):
        entries = [e for e in scheduled if e.group is group]
        if id(group) in bad or not any(b in lost for e in entries for b in e.seq.block_table):
            continue
        readers.append(group)
        lost.update(b for e in entries for b in _written(e, block_size))
    return lost, readers


def _written(entry: ScheduledSeq, block_size: int) -> list[int]:
    start = entry.seq.num_computed_tokens
    end = start + entry.num_tokens
    return entry.seq.block_table[start // block_size:(end - 1) // block_size + 1]


def concat_parts(parts: list[StepLogits]) -> StepLogits:
    """The logits, sampled entries and prompt logits of forwards run part by part, as one."""
    prompt = [chunk for _, _, chunks in parts for chunk in chunks]
    ran = [(logits, sampled) for logits, sampled, _ in parts if sampled]
    if not ran:
        return torch.empty(0, 0), [], prompt
    return (torch.cat([logits for logits, _ in ran]), [e for _, s in ran for e in s], prompt)


def plan_samples(sampled: list[ScheduledSeq], scheduler: Scheduler
                 ) -> tuple[list[SamplePlan], list[tuple[SequenceGroup, Exception]]]:
    """Which sequences take which logits row, and the groups whose fork failed.

    A request with n > 1 forks here, after its prompt. Entries of sequences no longer
    running (aborted or restarted this step) are skipped.
    """
    plans: dict[str, SamplePlan] = {}
    failed: list[tuple[SequenceGroup, Exception]] = []
    for row, entry in enumerate(sampled):
        group, seq = entry.group, entry.seq
        if seq.status is not SequenceStatus.RUNNING or (
                failed and any(g is group for g, _ in failed)):
            continue
        plan = plans.get(group.request_id)
        if plan is None and group.beam is None and group.params.n == 1:
            plans[group.request_id] = SamplePlan(group, [seq], [row])  # the common case
            continue
        if plan is None:
            plan = plans[group.request_id] = SamplePlan(
                group, group.seqs if group.beam is not None else [], [])
        if group.beam is not None:
            plan.rows.append(row)
            continue
        try:
            seqs = scheduler.fork_samples(group, seq)
        except Exception as exc:
            failed.append((group, exc))
            del plans[group.request_id]
            continue
        plan.seqs += seqs
        plan.rows += [row] * len(seqs)
    for plan in plans.values():
        if plan.group.beam is not None:
            # Rows come in the runner's order; beams are stepped in the group's order.
            by_seq = {sampled[r].seq.seq_id: r for r in plan.rows}
            plan.rows = [by_seq[s.seq_id] for s in plan.seqs]
    return list(plans.values()), failed


def compute_tokens(plans: list[SamplePlan], logits: torch.Tensor, sampler: Sampler,
                   max_model_len: int) -> dict[str, StepResult]:
    """Every plan's next tokens (samples) or next beams, by request id; changes nothing.

    Beams come first: the sampler draws random numbers, so it runs last.
    """
    results: dict[str, StepResult] = {}
    sampling: list[SamplePlan] = []
    for plan in plans:
        if plan.group.beam is None:
            sampling.append(plan)
            continue
        beams, state = plan.seqs, plan.group.beam
        at_limit = (beams[0].num_output_tokens + 1 >= state.params.max_tokens
                    or beams[0].num_tokens + 1 >= max_model_len)
        results[plan.group.request_id] = state.step(
            logits[plan.rows], [b.cumulative_logprob for b in beams],
            [b.output_token_ids for b in beams], at_limit)
    if sampling:
        rows = [r for p in sampling for r in p.rows]
        # Every row sampled once, in order (no forks, no beams): no copy needed.
        picked = logits if rows == list(range(len(logits))) else logits[rows]
        seqs = [s for p in sampling for s in p.seqs]
        masks = None
        if any(p.group.grammar is not None for p in sampling):
            masks = fill_token_masks([s.matcher for s in seqs], logits.shape[-1])
        samples = sampler(picked, seqs, [p.group.params for p in sampling for _ in p.seqs],
                          masks)
        i = 0
        for plan in sampling:
            k = len(plan.seqs)
            results[plan.group.request_id] = samples[i:i + k]
            i += k
    return results


def merge(parts: Iterable[dict[str, StepResult]]) -> dict[str, StepResult]:
    return {k: v for part in parts for k, v in part.items()}
