"""The kernels on a float8 e4m3 KV cache (kv_cache_dtype "fp8"): store_kv rounds exactly as
torch does, paged_attention reads what the float64 reference reads from the dequantized
cache, and block copies and swaps move the bytes unchanged.

The caches hold K / k_scale and V / v_scale; the scales here are not powers of two, so a
kernel that dropped or inverted one would be far off.
"""

import pytest
import torch

from kernels import copy_blocks, paged_attention, reference, store_kv, swap_blocks
from tests.kernels.test_paged_attention import (
    LLAMA,
    SMOLLM2,
    Batch,
    decode_seqs,
    make_batch,
    mixed_seqs,
)
from tests.kernels.test_window_attention import free_left_of_window

FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 0.37, 1.7
# The kernel reads the same float8 values as the reference; only the order of the
# float32 sums differs (bfloat16 queries: the dot's operands are rounded too).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: x / scale in float32, saturated at the largest e4m3 value, 448,
    rounded by torch to the nearest float8 (ties to even). NaN stays NaN. On the CPU:
    torch divides a CUDA tensor by a scalar as a product with its reciprocal."""
    return (x.cpu().float() / scale).clamp(-448, 448).to(FP8)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).cpu()


# ---- store_kv ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, K_SCALE, 8.0])
def test_store_kv_rounds_as_torch_does(device: torch.device, dtype: torch.dtype,
                                       scale: float) -> None:
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = 13, 3, 64, 8, 6
    # Key and value are strided views of a fused QKV-like tensor; magnitudes run from
    # e4m3's subnormals (below 2**-6 * scale) to outliers past 448 * scale.
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim)
    magnitude = torch.logspace(-4, 3.5, head_dim) * scale
    fused = (fused * magnitude).to(dtype).to(device)
    key, value = fused[:, num_kv_heads: 2 * num_kv_heads], fused[:, 2 * num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[torch.randperm(num_tokens)[:3]] = -1  # padding tokens
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # NaN marks every slot nobody may write.
    k_cache = torch.full(shape, float("nan"), device=device).to(FP8)
    v_cache = k_cache.clone()
    k_ref, v_ref = bits(k_cache).clone(), bits(v_cache).clone()  # on the CPU

    store_kv(key, value, k_cache, v_cache, slots.to(device), scale, 2 * scale)

    written = slots[slots >= 0].tolist()
    k_ref.view(-1, num_kv_heads, head_dim)[written] = bits(quantize(key, scale))[slots >= 0]
    v_ref.view(-1, num_kv_heads, head_dim)[written] = bits(quantize(value, 2 * scale))[
        slots >= 0]
    assert torch.equal(bits(k_cache), k_ref) and torch.equal(bits(v_cache), v_ref)
    stored = bits(k_cache).view(-1, num_kv_heads, head_dim)[written]
    assert (stored & 0x7F).ne(0x7F).all(), "outliers must saturate at 448, not become NaN"
    assert (stored & 0x7F).eq(0x7E).any() and (stored & 0x78).eq(0).any()  # both ends hit


def test_store_kv_rounds_every_tie_to_even(device: torch.device) -> None:
    # Every float8 value, every midpoint between neighbours, and the floats either side
    # of each midpoint: a rounding that breaks ties the wrong way or carries a mantissa
    # overflow badly into the exponent differs from torch on some of them.
    values = bits(torch.arange(256, dtype=torch.uint8)).view(FP8).float()
    values = values[~values.isnan()].unique()
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, torch.nextafter(mids, values[1:]),
                   torch.nextafter(mids, values[:-1]), torch.tensor([500.0, -1e30, -0.0])])
    x = torch.cat([x, x.new_zeros(-len(x) % 64)]).view(-1, 1, 64).to(device)
    cache = torch.zeros(len(x), 1, 1, 64, dtype=FP8, device=device)
    store_kv(x, x, cache, cache.clone(), torch.arange(len(x), device=device))
    assert torch.equal(bits(cache).view(x.shape), bits(quantize(x, 1.0)))


# ---- paged_attention --------------------------------------------------------------------


def fp8_batch(seqs: list[tuple[int, int]], dtype: torch.dtype, device: torch.device,
              heads: dict = SMOLLM2, block_size: int = 16, window: int | None = None) -> Batch:
    """A `make_batch` batch (NaN in unused slots, junk table entries) whose caches are
    quantized with K_SCALE and V_SCALE; freed blocks left of a window hold NaN too."""
    batch = make_batch(seqs, block_size=block_size, dtype=torch.float32,
                       device=torch.device("cpu"), **heads)
    if window is not None:
        free_left_of_window(batch, window)
    batch.query = batch.query.to(dtype).to(device)
    batch.k_cache = quantize(batch.k_cache, K_SCALE).to(device)
    batch.v_cache = quantize(batch.v_cache, V_SCALE).to(device)
    return batch


def check(batch: Batch, dtype: torch.dtype, **kwargs) -> None:
    out = torch.full_like(batch.query, float("nan"))
    paged_attention(*batch.args(), out=out, k_scale=K_SCALE, v_scale=V_SCALE, **kwargs)
    kwargs.pop("num_splits", None)
    args = list(batch.args())
    args[1] = batch.k_cache.float() * K_SCALE  # the dequantized caches, NaN where unused
    args[2] = batch.v_cache.float() * V_SCALE
    args[0] = batch.query.float()
    expected = reference.paged_attention(*args, **kwargs)
    assert not expected.isnan().any(), "the reference read an unused slot"
    # Under the interpreter a float8 NaN reads as 480: a stray read shows as a large error.
    assert not out.isnan().any(), "output elements left unwritten, or an unused slot read"
    error = (out.double() - expected.double()).norm() / expected.double().norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_attention_over_fp8_cache(device: torch.device, dtype: torch.dtype, kind: str) -> None:
    seqs = decode_seqs(16) if kind == "decode" else mixed_seqs(16)
    check(fp8_batch(seqs, dtype, device), dtype)


def test_attention_over_fp8_cache_llama_heads_split_decode(device: torch.device) -> None:
    # Flash-decoding splits: every partial result carries v_scale before the merge.
    batch = fp8_batch([(1, 1), (70, 1), (400, 1)], torch.float32, device, heads=LLAMA)
    check(batch, torch.float32, num_splits=3)


@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_attention_over_fp8_cache_window_and_softcap(device: torch.device, kind: str) -> None:
    seqs = decode_seqs(8) if kind == "decode" else mixed_seqs(8)
    window, softcap = 11, 1.5
    batch = fp8_batch(seqs, torch.float32, device, block_size=8, window=window)
    check(batch, torch.float32, window=window, softcap=softcap)


# ---- copy_blocks and swap_blocks ----------------------------------------------------------


def random_fp8_pool(num_blocks: int, device: torch.device) -> torch.Tensor:
    """[3 layers, K|V, blocks, 8 slots, 2 heads, 32 dims] of random bytes: every float8
    pattern, NaN included, must move unchanged."""
    pool = torch.randint(0, 256, (3, 2, num_blocks, 8, 2, 32), dtype=torch.uint8)
    return pool.to(device).view(FP8)


def test_copy_blocks_on_fp8_pool_is_exact(device: torch.device) -> None:
    pool = random_fp8_pool(12, device)
    pairs = torch.tensor([[0, 7], [3, 6], [5, 11], [1, 9]])
    expected = bits(pool).clone()
    reference.copy_blocks(expected, pairs)
    copy_blocks(pool, pairs.to(device))
    assert torch.equal(bits(pool), expected)


def test_swap_blocks_on_fp8_pools_is_exact(device: torch.device) -> None:
    src, dst = random_fp8_pool(7, device), random_fp8_pool(9, torch.device("cpu"))
    if device.type == "cuda":
        dst = dst.pin_memory()
    pairs = torch.tensor([[6, 0], [2, 8], [0, 3], [4, 4]])
    expected = bits(dst).clone()
    reference.swap_blocks(bits(src), expected, pairs)
    swap_blocks(src, dst, pairs)  # device -> cpu
    assert torch.equal(bits(dst), expected)
    back = random_fp8_pool(7, device)
    expected = bits(back).clone()
    reference.swap_blocks(bits(dst), expected, pairs[:, [1, 0]])
    swap_blocks(dst, back, pairs[:, [1, 0]])  # cpu -> device
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(bits(back), expected)
