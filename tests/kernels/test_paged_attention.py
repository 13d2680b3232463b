"""paged_attention against its float64 reference on random paged batches.

Every batch scatters its sequences over random, non-contiguous physical blocks,
fills unused block-table entries with junk and unused cache slots with NaN (a
read outside a sequence's context shows up as NaN), and poisons the output with
NaN (an element left unwritten fails).
"""

from dataclasses import dataclass

import pytest
import torch

from kernels import paged_attention, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass
class Batch:
    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    scale: float

    def args(self) -> tuple:
        return (
            self.query, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
            self.query_start_loc, self.max_query_len, self.max_seq_len, self.scale,
        )  # fmt: skip


def make_batch(
    seqs: list[tuple[int, int]],
    *,
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Batch:
    """A batch of (seq_len, q_len) sequences: seq_len counts the q_len new tokens."""
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody owns
    max_blocks = max(blocks_per_seq) + 2  # tail entries nobody may read
    physical = torch.randperm(num_blocks)
    # Junk in the unused tail: -1 for some rows, huge block ids for the others.
    tables = torch.where(
        torch.rand(len(seqs), 1) < 0.5,
        torch.full((len(seqs), max_blocks), -1),
        torch.randint(10**6, 10**7, (len(seqs), max_blocks)),
    )
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    start = 0
    for i, ((seq_len, _), n) in enumerate(zip(seqs, blocks_per_seq, strict=True)):
        tables[i, :n] = physical[start : start + n]
        start += n
        k_ctx = k_cache[tables[i, :n]].view(-1, num_kv_heads, head_dim)
        v_ctx = v_cache[tables[i, :n]].view(-1, num_kv_heads, head_dim)
        k_ctx[:seq_len] = torch.randn(seq_len, num_kv_heads, head_dim, dtype=dtype)
        v_ctx[:seq_len] = torch.randn(seq_len, num_kv_heads, head_dim, dtype=dtype)
        k_cache[tables[i, :n]] = k_ctx.view(n, *shape[1:])
        v_cache[tables[i, :n]] = v_ctx.view(n, *shape[1:])

    q_lens = torch.tensor([q_len for _, q_len in seqs])
    num_heads = group * num_kv_heads
    # The query is a strided view into a fused QKV-like tensor.
    fused = torch.randn(int(q_lens.sum()), num_heads + 2 * num_kv_heads, head_dim, dtype=dtype)
    return Batch(
        query=fused.to(device)[:, :num_heads],
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=tables.to(torch.int32).to(device),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        query_start_loc=torch.cat([q_lens.new_zeros(1), q_lens.cumsum(0)]).int().to(device),
        max_query_len=int(q_lens.max()),
        max_seq_len=max(s for s, _ in seqs),
        scale=head_dim**-0.5,
    )


def check(batch: Batch, dtype: torch.dtype, **kwargs: int) -> None:
    out = torch.full_like(batch.query, float("nan"))
    returned = paged_attention(*batch.args(), out=out, **kwargs)
    expected = reference.paged_attention(*batch.args())
    assert returned is out
    assert not out.isnan().any(), "output elements left unwritten or NaN"
    error = (out.double() - expected.double()).norm() / expected.double().norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


def decode_seqs(block_size: int) -> list[tuple[int, int]]:
    # The long one spans several key tiles of every launch shape.
    lengths = [1, block_size - 1, block_size, block_size + 1, 300]
    return [(seq_len, 1) for seq_len in lengths]


def mixed_seqs(block_size: int) -> list[tuple[int, int]]:
    return [
        (1, 1),  # a one-token prompt
        (block_size + 1, block_size + 1),  # a whole prompt in one chunk
        (4 * block_size + 3, 2 * block_size + 1),  # a later chunk over cached context
        (block_size, 1),  # decodes
        (block_size - 1, 1),
        (2 * block_size + 1, 3),  # a short chunk (speculative-decoding style)
    ]


SMOLLM2 = {"num_kv_heads": 3, "group": 3, "head_dim": 64}
LLAMA = {"num_kv_heads": 2, "group": 4, "head_dim": 128}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16])
def test_decode(device: torch.device, dtype: torch.dtype, block_size: int) -> None:
    batch = make_batch(
        decode_seqs(block_size), block_size=block_size, dtype=dtype, device=device, **SMOLLM2
    )
    check(batch, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_and_decode_mixed(
    device: torch.device, dtype: torch.dtype, block_size: int
) -> None:
    batch = make_batch(
        mixed_seqs(block_size), block_size=block_size, dtype=dtype, device=device, **SMOLLM2
    )
    check(batch, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_split_decode_merges_exactly(
    device: torch.device, dtype: torch.dtype, num_splits: int
) -> None:
    # 8 splits of a context of a few tiles leave some empty: they must weigh nothing.
    seqs = [(1, 1), (15, 1), (70, 1), (400, 1)]
    batch = make_batch(seqs, block_size=16, dtype=dtype, device=device, **SMOLLM2)
    check(batch, dtype, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_short_chunks_in_decode_mode(device: torch.device, num_splits: int) -> None:
    # Chunks of up to 5 tokens (16 rows // group 3) share the decode path and its
    # split. At 260 keys in 3 splits, the last split holds keys 256.. that the
    # chunk's first token (position 255) must not see: it merges an empty split.
    seqs = [(1, 1), (40, 2), (260, 5), (17, 3)]
    batch = make_batch(seqs, block_size=16, dtype=torch.float32, device=device, **SMOLLM2)
    check(batch, torch.float32, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqs", [decode_seqs(16), mixed_seqs(16)], ids=["decode", "mixed"])
def test_llama_heads(device: torch.device, dtype: torch.dtype, seqs: list[tuple[int, int]]) -> None:
    check(make_batch(seqs, block_size=16, dtype=dtype, device=device, **LLAMA), dtype)


@pytest.mark.parametrize("group", [1, 7, 20])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_group_sizes(device: torch.device, group: int, kind: str) -> None:
    seqs = decode_seqs(8) if kind == "decode" else mixed_seqs(8)
    batch = make_batch(
        seqs, block_size=8, num_kv_heads=2, group=group, head_dim=64,
        dtype=torch.float32, device=device,
    )  # fmt: skip
    check(batch, torch.float32)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_out_may_alias_query(device: torch.device, kind: str) -> None:
    seqs = decode_seqs(16) if kind == "decode" else mixed_seqs(16)
    batch = make_batch(seqs, block_size=16, dtype=torch.float32, device=device, **SMOLLM2)
    expected = reference.paged_attention(*batch.args())
    query = batch.query.clone()
    batch.query = query
    assert paged_attention(*batch.args(), out=query) is query
    torch.testing.assert_close(query, expected, rtol=1e-5, atol=1e-5)


def test_returns_new_tensor_in_query_dtype(device: torch.device) -> None:
    batch = make_batch(decode_seqs(16), block_size=16, dtype=torch.float16, device=device, **LLAMA)
    out = paged_attention(*batch.args())
    assert out.dtype == torch.float16 and out.shape == batch.query.shape
    assert out.is_contiguous()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
@pytest.mark.parametrize("heads", [SMOLLM2, LLAMA], ids=["smollm2", "llama"])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_sweep(
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    heads: dict[str, int],
    num_splits: int | None,
) -> None:
    seqs = decode_seqs(block_size) + mixed_seqs(block_size) + [(9 * block_size + 5, 1)]
    batch = make_batch(seqs, block_size=block_size, dtype=dtype, device=device, **heads)
    check(batch, dtype, num_splits=num_splits)
