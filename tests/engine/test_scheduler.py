"""Admission with the prefix cache, on plain Python objects: no model, no tensors.

The prefix-cache lookup is pure; a waiting request takes its cached blocks, and is
counted in the hit rate, only when it is admitted.
"""

import time

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import RequestMetrics, Sequence, SequenceGroup

PREFIX = list(range(100, 108))  # two full blocks of 4 tokens


def _group(request_id: str, *token_lists: list[int]) -> SequenceGroup:
    """A waiting request with one sequence per token list; several are samples of PREFIX
    that were preempted and wait to be recomputed."""
    prompt_len = len(token_lists[0]) if len(token_lists) == 1 else len(PREFIX)
    seqs = [Sequence(i, list(tokens), prompt_len, index=i) for i, tokens in enumerate(token_lists)]
    return SequenceGroup(request_id, None, list(token_lists[0][:prompt_len]),
                         SamplingParams(n=len(seqs), temperature=1.0), seqs,
                         RequestMetrics(arrival_time=time.time()))


def _scheduler(num_device_blocks: int) -> Scheduler:
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, preemption_mode="recompute")
    return Scheduler(config, BlockManager(4, num_device_blocks, num_cpu_blocks=0))


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
