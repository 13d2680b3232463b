"""store_kv against its reference: exact writes, padding slots skipped."""

import pytest
import torch

from kernels import reference, store_kv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "slot_dtype"),
    [(8, 3, 64, torch.int64), (16, 2, 128, torch.int32)],
)
def test_store_kv_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    slot_dtype: torch.dtype,
) -> None:
    num_tokens, num_blocks = 13, 6
    # key and value are strided views of one fused tensor, as a QKV projection gives.
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, dtype=dtype, device=device)
    key = fused[:, num_kv_heads : 2 * num_kv_heads]
    value = fused[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[torch.randperm(num_tokens, device=device)[:3]] = -1  # padding tokens
    slots = slots.to(slot_dtype)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # NaN marks every slot nobody may write; the references must agree on all of them.
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kv(key, value, k_cache, v_cache, slots)
    reference.store_kv(key, value, k_ref, v_ref, slots)

    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    assert int(torch.isnan(k_cache).all(-1).all(-1).logical_not().sum()) == num_tokens - 3


def test_store_kv_without_tokens_is_a_no_op(device: torch.device) -> None:
    k_cache = torch.randn(2, 8, 1, 64, device=device)
    v_cache = torch.randn_like(k_cache)
    before = (k_cache.clone(), v_cache.clone())
    empty = torch.empty(0, 1, 64, device=device)
    store_kv(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
