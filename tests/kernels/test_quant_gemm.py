"""The quantized GEMMs against dequantize-then-matmul in float64 (kernels.reference), and
the references' unpacking against hand-packed AWQ and GPTQ words."""

import pytest
import torch

import kernels
from kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Outputs are rounded once to x's dtype and float32 sums differ from float64 ones by
# rounding; the interpreter also rounds float32 to bfloat16 toward zero where the GPU
# rounds to nearest, so dequantized bfloat16 weights may differ by an ulp. Errors are
# measured against the largest output, as sums with cancellation have no relative bound.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = TOLERANCE[out.dtype]
    scale = ref.float().abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)


def random_int32(*shape: int, device: torch.device) -> torch.Tensor:
    """Every bit random: all 4-bit values, the sign bit included."""
    return torch.randint(-2**31, 2**31, shape, dtype=torch.int64, device=device).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 19])
def test_int8_gemm(device, dtype, m):
    n, k = 40, 72  # neither a whole tile
    x = torch.randn(m, k, device=device).to(dtype)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scale = torch.rand(n, device=device) / 64 + 1e-3
    assert_close(kernels.int8_gemm(x, weight, scale), reference.int8_gemm(x, weight, scale))


# (K, group_size): 3 whole groups; 3 groups of which the last is partial; one group.
SHAPES = [(96, 32), (80, 32), (48, 48)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 19])
@pytest.mark.parametrize("k,group_size", SHAPES)
def test_awq_gemm(device, dtype, m, k, group_size):
    n = 72
    groups = -(-k // group_size)
    qweight = random_int32(k, n // 8, device=device)
    qzeros = random_int32(groups, n // 8, device=device)
    scales = (torch.rand(groups, n, device=device) / 16 + 1e-3).to(torch.float16)
    x = torch.randn(m, k, device=device).to(dtype)
    out = kernels.awq_gemm(x, qweight, qzeros, scales, group_size)
    assert_close(out, reference.awq_gemm(x, qweight, qzeros, scales, group_size))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 19])
@pytest.mark.parametrize("k,group_size", SHAPES)
@pytest.mark.parametrize("zero_offset", [1, 0])
def test_gptq_gemm(device, dtype, m, k, group_size, zero_offset):
    n = 72
    groups = -(-k // group_size)
    qweight = random_int32(k // 8, n, device=device)
    qzeros = random_int32(groups, n // 8, device=device)
    scales = (torch.rand(groups, n, device=device) / 16 + 1e-3).to(dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    out = kernels.gptq_gemm(x, qweight, qzeros, scales, group_size, zero_offset)
    ref = reference.gptq_gemm(x, qweight, qzeros, scales, group_size, zero_offset)
    assert_close(out, ref)


@pytest.mark.parametrize("m", [1, 19])
def test_gptq_gemm_act_order(device, m):
    """Act-order checkpoints: groups follow g_idx, a permutation's grouping, not k."""
    k, n, group_size = 96, 72, 32
    g_idx = (torch.argsort(torch.randperm(k)) // group_size).to(torch.int32).to(device)
    qweight = random_int32(k // 8, n, device=device)
    qzeros = random_int32(k // group_size, n // 8, device=device)
    scales = torch.rand(k // group_size, n, device=device) / 16 + 1e-3
    x = torch.randn(m, k, device=device)
    out = kernels.gptq_gemm(x, qweight, qzeros, scales, group_size, g_idx=g_idx)
    assert_close(out, reference.gptq_gemm(x, qweight, qzeros, scales, group_size, g_idx=g_idx))


def test_gemms_take_leading_dims_and_empty_batches(device):
    x = torch.randn(2, 3, 64, device=device)
    weight = torch.randint(-127, 128, (16, 64), dtype=torch.int8, device=device)
    scale = torch.rand(16, device=device)
    out = kernels.int8_gemm(x, weight, scale)
    assert_close(out, reference.int8_gemm(x.reshape(6, 64), weight, scale).view(2, 3, 16))
    assert kernels.int8_gemm(x[:0, 0], weight, scale).shape == (0, 16)


def word(values: list[int]) -> int:
    """Eight 4-bit values packed into one int32, the first in the lowest bits."""
    packed = sum(v << (4 * i) for i, v in enumerate(values))
    return packed - (1 << 32) if packed >= 1 << 31 else packed


def test_reference_unpacking_follows_the_published_layouts():
    # AWQ: the j-th value packed is output column (0, 2, 4, 6, 1, 3, 5, 7)[j].
    packed = [10, 11, 12, 13, 14, 15, 1, 2]
    qweight = torch.tensor([[word(packed)]], dtype=torch.int32)
    zeros = torch.tensor([[word([1] * 8)]], dtype=torch.int32)
    scales = torch.ones(1, 8)
    w = reference.dequantize_awq(qweight, zeros, scales, group_size=1)
    by_column = [0] * 8
    for j, column in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
        by_column[column] = packed[j] - 1
    assert w[0].tolist() == by_column
    # GPTQ: 8 consecutive inputs of one column per word; zeros sequential, stored minus one.
    qweight = torch.tensor([[word(packed), word([3] * 8)] + [0] * 6], dtype=torch.int32)
    zeros = torch.tensor([[word([0, 2, 0, 0, 0, 0, 0, 0])]], dtype=torch.int32)
    scales = torch.tensor([[0.5, 2.0, 1, 1, 1, 1, 1, 1]])
    w = reference.dequantize_gptq(qweight, zeros, scales, group_size=8)
    assert w[:, 0].tolist() == [(v - 1) * 0.5 for v in packed]
    assert w[:, 1].tolist() == [0.0] * 8
    assert w[:, 2].tolist() == [-1.0] * 8
