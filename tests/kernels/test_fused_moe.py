"""The Triton fused_moe and the plain-torch fused_moe_torch against the float64
reference, and select_experts + fused_moe_torch against Transformers' own Mixtral
and Qwen3-MoE sparse blocks."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_moe, fused_moe_torch, reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
IMPLEMENTATIONS = {"triton": fused_moe, "torch": fused_moe_torch}


def make_weights(
    num_experts: int, hidden_size: int, inter_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] and w2 [E, H, I], scaled so activations stay of order one."""
    w13 = torch.randn(num_experts, 2 * inter_size, hidden_size) / hidden_size**0.5
    w2 = torch.randn(num_experts, hidden_size, inter_size) / inter_size**0.5
    return w13.to(dtype).to(device), w2.to(dtype).to(device)


def check(
    impl: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    out = impl(hidden, w13, w2, weights, ids)
    expected = reference.fused_moe(hidden, w13, w2, weights, ids)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    assert not out.isnan().any()
    error = (out.double() - expected.double()).norm() / expected.double().norm()
    assert error < TOLERANCE[hidden.dtype], f"relative error {error:.2e}"


# (tokens, experts, top_k, hidden, intermediate, renormalize): Mixtral's 8 experts
# top-2 and a Qwen3-MoE-like 16 experts top-4; sizes off the 16/64 tiles; 150 x 2
# pairs over 4 experts take the large-tile (prefill) path.
SHAPES = [
    (1, 8, 2, 64, 96, True),
    (37, 8, 2, 72, 40, True),
    (13, 16, 4, 48, 80, False),
    (13, 16, 4, 48, 80, True),
    (150, 4, 2, 40, 24, True),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-E{s[1]}-k{s[2]}" for s in SHAPES])
def test_against_reference(
    device: torch.device, impl: Callable[..., torch.Tensor], shape: tuple
) -> None:
    tokens, experts, top_k, hidden_size, inter_size, renormalize = shape
    hidden = torch.randn(tokens, hidden_size, device=device)
    w13, w2 = make_weights(experts, hidden_size, inter_size, torch.float32, device)
    logits = torch.randn(tokens, experts, device=device)
    weights, ids = reference.select_experts(logits, top_k, renormalize)
    check(impl, hidden, w13, w2, weights, ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_half_precision(
    device: torch.device, impl: Callable[..., torch.Tensor], dtype: torch.dtype
) -> None:
    hidden = torch.randn(21, 80, device=device, dtype=dtype)
    w13, w2 = make_weights(8, 80, 56, dtype, device)
    weights, ids = reference.select_experts(torch.randn(21, 8, device=device), 2, True)
    check(impl, hidden, w13, w2, weights, ids)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_idle_and_crowded_experts(device: torch.device, impl: Callable[..., torch.Tensor]) -> None:
    # Experts 0, 3 and 5 get nothing; expert 7 takes every token's first slot,
    # a group spanning several tiles; the hidden rows are a strided view and the
    # ids int32 (select_experts gives int64).
    tokens, experts = 40, 8
    fused = torch.randn(tokens, 3 * 48, device=device)
    hidden = fused[:, 48:96]
    w13, w2 = make_weights(experts, 48, 32, torch.float32, device)
    ids = torch.stack(
        [torch.full((tokens,), 7), torch.tensor([1, 2, 4, 6])[torch.arange(tokens) % 4]], dim=1
    ).to(device, torch.int32)
    weights = torch.rand(tokens, 2, device=device)
    check(impl, hidden, w13, w2, weights, ids)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_no_tokens(device: torch.device, impl: Callable[..., torch.Tensor]) -> None:
    w13, w2 = make_weights(8, 32, 16, torch.float32, device)
    hidden = torch.empty(0, 32, device=device)
    ids = torch.empty(0, 2, dtype=torch.int64, device=device)
    out = impl(hidden, w13, w2, torch.empty(0, 2, device=device), ids)
    assert out.shape == (0, 32)


def test_select_experts_renormalizes() -> None:
    logits = torch.randn(9, 16, dtype=torch.bfloat16)
    weights, ids = reference.select_experts(logits, 4, renormalize=True)
    assert weights.dtype == torch.float32 and weights.shape == ids.shape == (9, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    raw, raw_ids = reference.select_experts(logits, 4, renormalize=False)
    assert torch.equal(ids, raw_ids)
    assert (raw.sum(-1) < 1).all()


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Transformers leaves the experts' 3-D parameters uninitialised outside from_pretrained."""
    for param in module.parameters():
        torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    return module.eval()


def check_block(block: torch.nn.Module, top_k: int, renormalize: bool) -> None:
    """The block's forward against select_experts + fused_moe_torch on its own weights
    (experts.gate_up_proj is [E, 2I, H], gate rows first; experts.down_proj [E, H, I])."""
    hidden = torch.randn(3, 11, block.gate.weight.shape[1])
    with torch.no_grad():
        expected = block(hidden).reshape(-1, hidden.shape[-1])
        flat = hidden.reshape(-1, hidden.shape[-1])
        weights, ids = reference.select_experts(
            F.linear(flat, block.gate.weight), top_k, renormalize
        )
        out = fused_moe_torch(
            flat, block.experts.gate_up_proj, block.experts.down_proj, weights, ids
        )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_mixtral_block() -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=64, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2
    )
    check_block(randomize_(MixtralSparseMoeBlock(config)), top_k=2, renormalize=True)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_block(norm_topk_prob: bool) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=64,
        moe_intermediate_size=48,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=norm_topk_prob,
    )
    block = randomize_(Qwen3MoeSparseMoeBlock(config))
    check_block(block, top_k=4, renormalize=norm_topk_prob)
