"""Block manager and scheduler on plain Python objects: no model, no tensors."""

import time

from engine.block_manager import FREED, BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import RequestMetrics, Sequence, SequenceGroup, SequenceStatus


def _group(request_id: str, prompt_len: int, arrival: float | None = None) -> SequenceGroup:
    tokens = list(range(100, 100 + prompt_len))
    seq = Sequence(seq_id=hash(request_id) & 0xFFFF, token_ids=list(tokens), prompt_len=prompt_len)
    return SequenceGroup(request_id, None, tokens, SamplingParams(temperature=0), [seq],
                         RequestMetrics(arrival_time=arrival or time.time()))


def test_allocation_grows_only_at_block_boundaries():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=0)
    seq = Sequence(0, [1, 2, 3, 4, 5], prompt_len=5)
    copies: list[tuple[int, int]] = []
    bm.allocate_slots(seq, 5, copies)
    assert len(seq.block_table) == 2 and bm.device.num_free == 6
    seq.num_computed_tokens = 5
    for n_tokens in (6, 7, 8):  # fill the second block: no new block
        assert bm.num_new_blocks(seq, 1) == 0
        bm.allocate_slots(seq, 1, copies)
        seq.num_computed_tokens = n_tokens
    assert len(seq.block_table) == 2
    assert bm.num_new_blocks(seq, 1) == 1  # the ninth token opens a third block
    bm.allocate_slots(seq, 1, copies)
    assert len(seq.block_table) == 3 and not copies
    bm.free(seq)
    assert bm.device.num_free == 8 and seq.block_table == []


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=0)
    parent = Sequence(0, list(range(6)), prompt_len=6)
    bm.allocate_slots(parent, 6, [])
    parent.num_computed_tokens = 6
    child = Sequence(1, list(range(6)), prompt_len=6, num_computed_tokens=6)
    bm.fork(parent, child, [])
    full, partial = parent.block_table
    assert bm.device.ref_counts[full] == 2 and bm.device.ref_counts[partial] == 2
    copies: list[tuple[int, int]] = []
    bm.allocate_slots(child, 1, copies)
    assert copies == [(partial, child.block_table[1])] and child.block_table[0] == full
    bm.allocate_slots(parent, 1, copies)  # now the parent owns its block alone: no copy
    assert len(copies) == 1 and bm.num_cow_copies == 1
    bm.free(parent)
    bm.free(child)
    assert bm.device.num_free == 8


def test_swap_round_trip_keeps_shared_blocks_shared():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=8)
    group = _group("a", 6)
    parent = group.seqs[0]
    bm.allocate_slots(parent, 6, [])
    child = Sequence(1, list(parent.token_ids), prompt_len=6)
    bm.fork(parent, child, [])
    group.seqs.append(child)
    out_map = bm.swap_out(group)
    assert len(out_map) == 2 and bm.device.num_free == 8 and bm.cpu.num_free == 6
    assert parent.block_table == child.block_table
    for seq in group.seqs:
        seq.status = SequenceStatus.SWAPPED
    in_map = bm.swap_in(group)
    assert set(in_map) == set(out_map.values()) and bm.cpu.num_free == 8
    assert all(bm.device.ref_counts[b] == 2 for b in parent.block_table)


def _cached_then_freed(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Prefill `tokens` (registering their full blocks in the prefix cache), free them, and
    return the blocks they held."""
    seq = Sequence(0, list(tokens), prompt_len=len(tokens))
    bm.allocate_slots(seq, len(tokens), [])
    bm.cache_full_blocks(seq, len(tokens))
    blocks = list(seq.block_table)
    bm.free(seq)
    return blocks


def _state(bm: BlockManager) -> tuple:
    return (list(bm.device.ref_counts), list(bm.device._free), dict(bm._cached),
            dict(bm._by_hash), bm.num_queried_tokens, bm.num_hit_tokens)


def test_prefix_cache_reuses_blocks_and_rejects_hash_collisions(monkeypatch):
    bm = BlockManager(block_size=4, num_device_blocks=16, num_cpu_blocks=0)
    _cached_then_freed(bm, list(range(10)))
    same = Sequence(1, list(range(9)) + [99], prompt_len=10)
    prefix = bm.find_cached_prefix(same)
    assert prefix.num_tokens == 8 and len(prefix.blocks) == 2  # two full blocks reused
    bm.allocate_prefix(same, prefix)
    assert same.block_table == list(prefix.blocks) and same.num_computed_tokens == 8
    bm.free(same)
    # Every block now hashes alike: the token check must refuse the cached block.
    monkeypatch.setattr(BlockManager, "hash_block", staticmethod(lambda parent, tokens: 0))
    other = Sequence(2, [50 + i for i in range(10)], prompt_len=10)
    assert bm.find_cached_prefix(other).blocks == ()


def test_finding_a_cached_prefix_changes_nothing_and_allocating_commits():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=0)
    blocks = _cached_then_freed(bm, list(range(10)))
    holder = Sequence(1, list(range(5)), prompt_len=5)  # holds the first cached block
    bm.allocate_prefix(holder, bm.find_cached_prefix(holder))
    seq = Sequence(2, list(range(9)) + [99], prompt_len=10)
    before = _state(bm)
    prefix = bm.find_cached_prefix(seq)
    assert bm.find_cached_prefix(seq) == prefix
    assert _state(bm) == before and seq.block_table == [] and seq.num_computed_tokens == 0
    # The second block sits in the free list: taking it uses up a free block.
    assert prefix.blocks == tuple(blocks[:2]) and prefix.num_free_blocks == 1
    num_free, queried, hit = bm.device.num_free, bm.num_queried_tokens, bm.num_hit_tokens
    bm.allocate_prefix(seq, prefix)
    assert [bm.device.ref_counts[b] for b in prefix.blocks] == [2, 1]
    assert bm.device.num_free == num_free - 1
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (queried + 10, hit + 8)


def test_blocks_behind_the_window_are_freed_and_stay_freed_through_swaps_and_forks():
    bm = BlockManager(block_size=4, num_device_blocks=8, num_cpu_blocks=8,
                      enable_prefix_caching=False, window=6)
    seq = Sequence(0, list(range(13)), prompt_len=13)
    bm.allocate_slots(seq, 13, [])
    seq.num_computed_tokens = 13  # the next query (position 13) sees 8..13: blocks 2, 3
    bm.free_behind_window(seq)
    assert seq.block_table[:2] == [FREED, FREED] and bm.device.num_free == 6
    assert seq.seq_id in bm.take_changed()
    bm.free_behind_window(seq)  # nothing more to free: nothing changes
    assert bm.device.num_free == 6 and not bm.take_changed()
    group = SequenceGroup("r", None, seq.token_ids, SamplingParams(temperature=0), [seq],
                          RequestMetrics(arrival_time=time.time()))
    seq.status = SequenceStatus.RUNNING
    assert bm.can_swap_out(group)
    moved = bm.swap_out(group)
    assert len(moved) == 2 and seq.block_table[:2] == [FREED, FREED]
    assert bm.device.num_free == 8 and bm.cpu.num_free == 6
    bm.swap_in(group)
    assert seq.block_table[:2] == [FREED, FREED] and bm.device.num_free == 6
    child = Sequence(1, list(seq.token_ids), prompt_len=13)
    bm.fork(seq, child, [])
    assert child.block_table == seq.block_table and bm.device.num_free == 6
    bm.share_blocks = False
    copied = Sequence(2, list(seq.token_ids), prompt_len=13)
    copies: list[tuple[int, int]] = []
    bm.fork(seq, copied, copies)
    assert copied.block_table[:2] == [FREED, FREED] and len(copies) == 2
    for s in (seq, child, copied):
        bm.free(s)
    assert bm.device.num_free == 8 and bm.cpu.num_free == 8
