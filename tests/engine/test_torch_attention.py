"""The torch attention backend against the float64 reference of `kernels/reference.py`.

A mixed batch (decodes of many context lengths, a prefill chunk over cached context,
a whole prompt) over a pool whose unwritten slots hold NaN; decode groups forced
small so that one step splits into many. Under a sliding window, the blocks a
sequence's window has left behind are "freed": its table points them at a NaN
block. The Triton backend (interpreted) takes the same windowed batch once.
"""

import random

import pytest
import torch

import engine.torch_attention as torch_attention
from engine.attention import AttentionMetadata
from engine.torch_attention import TorchBackend, plan_decode_groups
from engine.triton_attention import TritonBackend
from kernels.reference import paged_attention

BLOCK_SIZE, KV_HEADS, HEADS, HEAD_DIM = 8, 2, 6, 16


def _batch(seq_lens: list[int], query_lens: list[int], seed: int = 0,
           window: int | None = None):
    """Random K/V written into a NaN pool at random blocks; metadata for the batch."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in seq_lens) + 4
    k_cache = torch.full((num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), float("nan"))
    v_cache = k_cache.clone()
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, new_k, new_v, slots = [], [], [], []
    for ctx, q_len in zip(seq_lens, query_lens, strict=True):
        table = [free.pop() for _ in range(-(-ctx // BLOCK_SIZE))]
        tables.append(table)
        for pos in range(ctx):
            slot = table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
            k, v = torch.randn(KV_HEADS, HEAD_DIM), torch.randn(KV_HEADS, HEAD_DIM)
            k_cache.view(-1, KV_HEADS, HEAD_DIM)[slot] = k
            v_cache.view(-1, KV_HEADS, HEAD_DIM)[slot] = v
            if pos >= ctx - q_len:
                new_k.append(k)
                new_v.append(v)
                slots.append(slot)
    if window is not None:
        for table, ctx, q_len in zip(tables, seq_lens, query_lens, strict=True):
            gone = max(0, ctx - q_len - window + 1) // BLOCK_SIZE
            table[:gone] = [free[0]] * gone  # a block nobody wrote: NaN
    width = max(map(len, tables))
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        num_decodes=sum(1 for n in query_lens if n == 1),
        seq_lens_cpu=seq_lens, query_lens_cpu=query_lens)
    q = torch.randn(starts[-1], HEADS, HEAD_DIM)
    return q, torch.stack(new_k), torch.stack(new_v), k_cache, v_cache, meta


def _check(seq_lens: list[int], query_lens: list[int], window: int | None = None,
           softcap: float | None = None, backend_class: type = TorchBackend) -> TorchBackend:
    q, k, v, k_cache, v_cache, meta = _batch(seq_lens, query_lens, window=window)
    backend = backend_class(BLOCK_SIZE)
    backend.prepare(meta)
    out = backend.attend(q, k, v, k_cache, v_cache, meta, 0.25, window, softcap)
    want = paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                           meta.query_start_loc, meta.max_query_len, meta.max_seq_len, 0.25,
                           window=window, softcap=softcap)
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    return backend


@pytest.mark.parametrize("max_slots", [10**9, 64])
def test_mixed_batch_matches_the_reference(monkeypatch, max_slots):
    monkeypatch.setattr(torch_attention, "MAX_GROUP_SLOTS", max_slots)
    rng = random.Random(1)
    decodes = [rng.randint(1, 70) for _ in range(12)]
    backend = _check(decodes + [40, 23], [1] * 12 + [9, 23])  # a chunk, then a whole prompt
    assert len(backend.decode_groups()) > (1 if max_slots == 64 else 0)


@pytest.mark.parametrize("softcap", [None, 2.0])
# Window 7: the chunk's first token (position 21) sees from key 15, the last of a block.
@pytest.mark.parametrize("window", [None, 1, 6, 7, 8, 1000])
def test_window_and_softcap_match_the_reference(monkeypatch, window, softcap):
    monkeypatch.setattr(torch_attention, "MAX_GROUP_SLOTS", 64)
    rng = random.Random(2)
    decodes = [rng.randint(1, 70) for _ in range(12)]
    _check(decodes + [40, 23], [1] * 12 + [19, 23], window, softcap)


def test_windowed_decodes_gather_only_their_window():
    backend = _check([17, 30, 5], [1, 1, 1], window=8)
    (group,) = backend.decode_groups(8)
    assert group.slots.numel() == 3 * 8
    # A window that hides no key shares the global layers' plan.
    assert backend.decode_groups(30) is backend.decode_groups()


def test_triton_backend_takes_window_and_softcap():
    _check([1, 9, 17, 40, 33], [1, 1, 1, 19, 33], window=6, softcap=2.0,
           backend_class=TritonBackend)


def test_equal_lengths_make_one_unmasked_group_in_order():
    (group,) = _check([17] * 5, [1] * 5).decode_groups()
    assert group.rows is None and group.mask is None


def test_groups_bound_padding_and_cover_every_decode_once():
    lens = [300, 290, 100, 95, 90, 10, 9, 1]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(8, dtype=torch.int64),
        block_tables=torch.zeros(8, 40, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.arange(9, dtype=torch.int32), max_query_len=1,
        max_seq_len=300, num_decodes=8, seq_lens_cpu=lens, query_lens_cpu=[1] * 8)
    groups = plan_decode_groups(meta, BLOCK_SIZE)
    rows = [r for g in groups for r in g.rows.tolist()]
    assert sorted(rows) == list(range(8))
    for g in groups:
        members = [lens[r] for r in g.rows.tolist()]
        padded = max(members) * len(members)
        assert padded <= (1 + torch_attention.MAX_PADDING) * sum(members) or len(members) == 1
