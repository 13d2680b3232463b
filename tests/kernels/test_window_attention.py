"""Sliding-window and soft-capped paged attention: the reference against Transformers'
masks and eager attention, the kernel against the reference.

Batches come from `make_batch` (NaN in unused slots, junk in unused table entries);
here the blocks wholly left of a sequence's window are also "freed": their table
entries become junk and their slots NaN, so a kernel that reads one fails.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config, MistralConfig
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from kernels import paged_attention, reference
from tests.kernels.test_paged_attention import SMOLLM2, TOLERANCE, Batch, make_batch

BLOCK = 8


def free_left_of_window(batch: Batch, window: int) -> None:
    """Free each sequence's blocks that its first new token's window has left behind."""
    block_size = batch.k_cache.shape[1]
    starts = batch.query_start_loc.tolist()
    for i, seq_len in enumerate(batch.seq_lens.tolist()):
        q_len = starts[i + 1] - starts[i]
        gone = max(0, seq_len - q_len - window + 1) // block_size
        blocks = batch.block_tables[i, :gone].long()
        batch.k_cache[blocks] = float("nan")
        batch.v_cache[blocks] = float("nan")
        batch.block_tables[i, :gone] = -1 if i % 2 else 10**7


def windowed_batch(seqs: list[tuple[int, int]], window: int | None, *,
                   dtype: torch.dtype = torch.float32, heads: dict = SMOLLM2,
                   block_size: int = BLOCK) -> Batch:
    batch = make_batch(seqs, block_size=block_size, dtype=dtype, device=torch.device("cpu"),
                       **heads)
    if window is not None:
        free_left_of_window(batch, window)
    return batch


def check(batch: Batch, dtype: torch.dtype = torch.float32, **kwargs) -> None:
    out = torch.full_like(batch.query, float("nan"))
    paged_attention(*batch.args(), out=out, **kwargs)
    kwargs.pop("num_splits", None)
    expected = reference.paged_attention(*batch.args(), **kwargs)
    assert not expected.isnan().any(), "the reference read a freed block"
    assert not out.isnan().any(), "output elements left unwritten, or a freed block read"
    error = (out.double() - expected.double()).norm() / expected.double().norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("config_class", [MistralConfig, Gemma2Config])
def test_reference_follows_transformers_window_and_softcap(config_class) -> None:
    # One 11-token prompt, window 4: position p sees p-3 .. p. A window read as
    # p-4 .. p (one key more) changes every row from p = 4 on.
    window, softcap, seq_len, kv_heads, group, head_dim = 4, 1.5, 11, 2, 3, 16
    batch = make_batch([(seq_len, seq_len)], block_size=BLOCK, num_kv_heads=kv_heads,
                       group=group, head_dim=head_dim, dtype=torch.float32,
                       device=torch.device("cpu"))
    config = config_class(sliding_window=window)
    config._attn_implementation = "eager"
    mask = create_sliding_window_causal_mask(
        config=config, inputs_embeds=torch.zeros(1, seq_len, 8), attention_mask=None,
        cache=None, position_ids=torch.arange(seq_len)[None])
    k = batch.k_cache[batch.block_tables[0, :2].long()].flatten(0, 1)[:seq_len]
    v = batch.v_cache[batch.block_tables[0, :2].long()].flatten(0, 1)[:seq_len]
    module = SimpleNamespace(num_key_value_groups=group, training=False)
    want, _ = eager_attention_forward(
        module, batch.query.double().transpose(0, 1)[None], k.double().transpose(0, 1)[None],
        v.double().transpose(0, 1)[None], mask.double(), scaling=batch.scale, softcap=softcap)
    got = reference.paged_attention(*batch.args(), window=window, softcap=softcap)
    # Transformers takes the softmax in float32.
    torch.testing.assert_close(got.double(), want[0], rtol=1e-5, atol=1e-6)
    one_more = reference.paged_attention(*batch.args(), window=window + 1, softcap=softcap)
    assert (one_more - got)[window:].abs().amax(dim=(1, 2)).min() > 1e-3


def decode_seqs(window: int = 0) -> list[tuple[int, int]]:
    # At window + BLOCK the lowest visible key starts a block; at window + 2 * BLOCK - 1
    # it ends one (skipping one block too many or too few then shows).
    lengths = (1, BLOCK - 1, BLOCK, BLOCK + 1, 41, 150, window + BLOCK, window + 2 * BLOCK - 1)
    return [(n, 1) for n in lengths]


# Inside one block, a block's width, two blocks and one key, and wider than every context.
@pytest.mark.parametrize("window", [5, BLOCK, 2 * BLOCK + 1, 1000])
def test_decode(window: int) -> None:
    check(windowed_batch(decode_seqs(window), window), window=window)


@pytest.mark.parametrize("window", [1, BLOCK, 20])
def test_prefill_and_chunks(window: int) -> None:
    seqs = [
        (1, 1),  # a one-token prompt
        (3 * BLOCK + 5, 3 * BLOCK + 5),  # a whole prompt longer than the window
        (60, 25),  # a chunk over cached context, longer than the window
        (45, 4),  # a short chunk whose window starts mid-block
        (2 * BLOCK + 3, 1),  # decodes
        (BLOCK, 1),
    ]
    check(windowed_batch(seqs, window), window=window)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_short_chunks_in_decode_mode(num_splits: int) -> None:
    # Chunks of up to 5 tokens share the decode path and its split; the window of
    # the chunk's first token reaches further left than its last token's.
    seqs = [(1, 1), (40, 2), (130, 5), (17, 3)]
    check(windowed_batch(seqs, 10), window=10, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [2, 8])
def test_split_decode(num_splits: int) -> None:
    # 8 splits of a window of a few tiles leave some empty: they must weigh nothing.
    seqs = [(1, 1), (15, 1), (70, 1), (300, 1)]
    check(windowed_batch(seqs, 37, block_size=16), window=37, num_splits=num_splits)


@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_softcap(window: int | None, kind: str) -> None:
    seqs = decode_seqs() if kind == "decode" else [(30, 30), (50, 9), (20, 1), (9, 1)]
    check(windowed_batch(seqs, window), window=window, softcap=2.0)


@pytest.mark.parametrize("group", [1, 4])
def test_group_sizes(group: int) -> None:
    heads = {"num_kv_heads": 2, "group": group, "head_dim": 32}
    seqs = [(33, 33), (50, 7), (70, 1), (12, 1)]
    check(windowed_batch(seqs, 9, heads=heads), window=9, softcap=5.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    seqs = [(40, 40), (70, 11), (90, 1), (6, 1)]
    check(windowed_batch(seqs, 16, dtype=dtype), dtype, window=16, softcap=30.0)


def test_rejects_an_empty_window() -> None:
    batch = windowed_batch([(5, 1)], None)
    with pytest.raises(ValueError, match="at least one key"):
        paged_attention(*batch.args(), window=0)
