"""The scheduler and its block manager on plain Python objects: no model, no tensors.

Steps are driven as the engine drives them (schedule, advance, update_from_output)
with made-up tokens. The prefix-cache lookup is pure; a waiting request takes its
cached blocks, and is counted in the hit rate, only when it is admitted.
"""

import time

import pytest
import torch

from engine.config import EngineConfig
from engine.sampler import SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import SamplePlan, SchedulerOutput
from engine.seq_factory import SequenceFactory
from engine.sequence import RequestMetrics, Sequence, SequenceGroup, SequenceStatus
from engine.stop_checker import StopChecker

EOS = 2

PREFIX = list(range(100, 108))  # two full blocks of 4 tokens


def _group(request_id: str, *token_lists: list[int]) -> SequenceGroup:
    """A waiting request with one sequence per token list; several are samples of PREFIX
    that were preempted and wait to be recomputed."""
    prompt_len = len(token_lists[0]) if len(token_lists) == 1 else len(PREFIX)
    seqs = [Sequence(i, list(tokens), prompt_len, index=i) for i, tokens in enumerate(token_lists)]
    return SequenceGroup(request_id, None, list(token_lists[0][:prompt_len]),
                         SamplingParams(n=len(seqs), temperature=1.0), seqs,
                         RequestMetrics(arrival_time=time.time()))


def _scheduler(num_device_blocks: int, num_cpu_blocks: int = 0,
               preemption_mode: str = "recompute", **config) -> Scheduler:
    config = EngineConfig(block_size=4, max_num_batched_tokens=64,
                          preemption_mode=preemption_mode, **config)
    factory = SequenceFactory(torch.device("cpu"), None, {EOS}, seed=0)
    return Scheduler(config, num_device_blocks, num_cpu_blocks, factory,
                     StopChecker({EOS}, max_model_len=1000, tokenizer=None))


def _step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """One step as the engine runs it, the model replaced by `token` for every sample."""
    out = sched.schedule()
    sched.advance(out.scheduled)
    plans: dict[str, SamplePlan] = {}
    for entry in out.scheduled:
        seq, group = entry.seq, entry.group
        if seq.num_computed_tokens == seq.num_tokens:
            seqs = sched.fork_samples(group, seq)
            plan = plans.setdefault(group.request_id, SamplePlan(group, [], []))
            plan.seqs += seqs
    results = {rid: [SampleResult(token, None, None) for _ in plan.seqs]
               for rid, plan in plans.items()}
    updated, failed = sched.update_from_output(list(plans.values()), results, time.time())
    assert not failed
    for group in updated:
        if group.is_finished:
            sched.remove(group)
    return out


def _single(request_id: str, prompt_len: int, arrival: float, **params) -> SequenceGroup:
    tokens = list(range(100, 100 + prompt_len))
    seq = Sequence(hash(request_id) & 0xFFFF, list(tokens), prompt_len)
    return SequenceGroup(request_id, None, tokens,
                         SamplingParams(temperature=0, **params), [seq],
                         RequestMetrics(arrival_time=arrival))


def _cache_prefix(sched: Scheduler) -> list[int]:
    """Prefill PREFIX + one token, then finish: its two full blocks stay cached, and free."""
    warm = _group("warm", PREFIX + [1])
    sched.add(warm)
    sched.schedule()
    blocks = list(warm.seqs[0].block_table)
    sched.remove(warm)
    return blocks


def _state(sched: Scheduler) -> tuple:
    bm = sched.bm
    return (list(bm.device.ref_counts), list(bm.device._free), dict(bm._cached),
            bm.num_queried_tokens, bm.num_hit_tokens, [s.block_table for s in
                                                       sched.waiting[0].seqs])


def test_hit_rate_counts_a_waiting_request_once_at_admission():
    sched = _scheduler(num_device_blocks=6)
    first = _group("first", PREFIX + [1])  # 3 blocks; its 2 full ones get cached
    hog = _group("hog", list(range(200, 212)))  # 3 blocks: the pool is full
    second = _group("second", PREFIX + [2, 3, 4, 5, 6])  # hits 8 tokens, needs 2 more blocks
    for group in (first, hog, second):
        sched.add(group)
    # The model never runs: the same prefill steps repeat while `second` waits.
    for _ in range(10):
        out = sched.schedule()
        assert {e.group.request_id for e in out.scheduled} == {"first", "hog"}
        assert list(sched.waiting) == [second] and second.seqs[0].block_table == []
    bm = sched.bm
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (9 + 12, 0)
    sched.remove(hog)
    out = sched.schedule()
    assert second in sched.running and second.metrics.num_cached_tokens == 8
    assert second.seqs[0].block_table[:2] == first.seqs[0].block_table[:2]
    assert [e.num_tokens for e in out.scheduled if e.group is second] == [13 - 8]
    assert bm.prefix_cache_hit_rate == 8 / (9 + 12 + 13)


@pytest.mark.parametrize("hog_len, admitted", [(4, True), (8, False)])
def test_cached_blocks_in_the_free_list_count_as_free_until_taken(hog_len, admitted):
    sched = _scheduler(num_device_blocks=5)
    cached = _cache_prefix(sched)
    sched.add(_group("hog", list(range(200, 200 + hog_len))))
    sched.schedule()
    # 2 cached blocks (free) + 2 new ones: fits in 4 free blocks, not in 3.
    seq = (group := _group("second", PREFIX + [2, 3, 4, 5, 6])).seqs[0]
    sched.add(group)
    before = _state(sched)
    sched.schedule()
    if admitted:
        assert seq.block_table[:2] == cached[:2] and sched.bm.device.num_free == 0
    else:
        assert _state(sched) == before and seq.num_computed_tokens == 0


@pytest.mark.parametrize("hog_len, admitted", [(4, True), (8, False)])
def test_recomputed_samples_fit_with_their_cached_prefix_shared(hog_len, admitted):
    sched = _scheduler(num_device_blocks=5)
    cached = _cache_prefix(sched)
    sched.add(_group("hog", list(range(200, 200 + hog_len))))
    sched.schedule()
    # The cache leaves the first sample one token, so its sibling adopts the prefix too:
    # 2 cached blocks + a last block each = 4 blocks.
    group = _group("samples", PREFIX + [1], PREFIX + [2])
    sched.add(group)
    before = _state(sched)
    out = sched.schedule()
    if admitted:
        leader, sibling = group.seqs
        assert leader.block_table[:2] == sibling.block_table[:2] == cached[:2]
        assert [(e.seq, e.num_tokens) for e in out.scheduled if e.group is group] == [
            (leader, 1), (sibling, 1)]
        assert sched.bm.device.num_free == 0
    else:
        assert _state(sched) == before and group in sched.waiting


def test_exhaustion_preempts_instead_of_crashing():
    sched = _scheduler(num_device_blocks=4, enable_prefix_caching=False)
    a, b = _single("a", 8, arrival=1.0), _single("b", 8, arrival=2.0)
    sched.add(a)
    sched.add(b)
    _step(sched)  # both prompts fill 2 blocks each
    assert sched.bm.device.num_free == 0
    out = _step(sched)  # each needs a third block: the later arrival goes
    assert out.preempted == [b] and b in sched.waiting
    assert b.seqs[0].num_computed_tokens == 0 and b.metrics.num_preemptions == 1
    assert [e.seq for e in out.scheduled] == [a.seqs[0]]


def test_request_larger_than_the_pool_is_reported_not_run():
    sched = _scheduler(num_device_blocks=2)
    big = _single("big", 20, arrival=1.0)
    sched.add(big)
    out = sched.schedule()
    assert out.never_fit == [big] and "needs 5 KV blocks" in big.abort_reason
    assert not out.scheduled and sched.bm.device.num_free == 2


def test_update_from_output_appends_stops_and_frees():
    sched = _scheduler(num_device_blocks=8)
    short = _single("short", 5, arrival=1.0, max_tokens=2, ignore_eos=True)
    eos = _single("eos", 3, arrival=2.0, max_tokens=10)
    for group in (short, eos):
        sched.add(group)
    _step(sched, token=7)
    assert short.seqs[0].output_token_ids == [7] == eos.seqs[0].output_token_ids
    assert sched.num_prompt_tokens == 8 and sched.num_generated_tokens == 2
    _step(sched, token=EOS)
    assert short.seqs[0].status is SequenceStatus.FINISHED_LENGTH
    assert eos.seqs[0].status is SequenceStatus.FINISHED_STOPPED
    assert eos.seqs[0].output_token_ids == [7, EOS]
    assert not sched.has_unfinished() and sched.bm.device.num_free == 8
    assert short.seqs[0].block_table == [] == eos.seqs[0].block_table


def test_samples_fork_after_the_prompt_and_share_its_blocks():
    sched = _scheduler(num_device_blocks=8)
    tokens = list(range(100, 106))
    group = SequenceGroup("n3", None, tokens, SamplingParams(n=3, temperature=1.0,
                                                             max_tokens=4),
                          [Sequence(0, list(tokens), 6)], RequestMetrics(time.time()))
    sched.add(group)
    _step(sched)
    parent, *children = group.seqs
    assert len(group.seqs) == 3 and all(c.block_table == parent.block_table for c in children)
    assert all(sched.bm.device.ref_counts[b] == 3 for b in parent.block_table)
    out = _step(sched)  # each writes the shared, partly filled last block: two copies
    assert len(out.blocks_to_copy) == 2 and sched.bm.num_cow_copies == 2
    assert len({s.block_table[1] for s in group.seqs}) == 3


def test_a_swapped_table_is_freed_from_the_cpu_pool_whatever_its_status():
    sched = _scheduler(num_device_blocks=4, num_cpu_blocks=4, preemption_mode="swap",
                       enable_prefix_caching=False)
    a, b = _single("a", 8, arrival=1.0), _single("b", 8, arrival=2.0)
    sched.add(a)
    sched.add(b)
    _step(sched)
    out = _step(sched)
    assert out.preempted == [b] and b in sched.swapped and sched.bm.cpu.num_free == 2
    b.seqs[0].status = SequenceStatus.FINISHED_ABORTED  # the order no longer matters
    sched.remove(b)
    assert sched.bm.cpu.num_free == 4 and set(sched.bm.cpu.ref_counts) == {0}
