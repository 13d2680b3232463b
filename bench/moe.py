"""CPU mixture-of-experts layer: pagedq's torch path against Transformers' sparse MoE block.

For a Mixtral-shaped block (8 experts, top-2) and a Qwen3-MoE-shaped one (64 experts,
top-8), both CPU-sized and float32 with random weights, at decode batch sizes, it
times (median ms per call, the same inputs, one run):
  - pagedq: router matmul + `kernels.reference.select_experts` + `kernels.fused_moe_torch`;
  - the Transformers block's forward with its experts run "eager" (what a block built
    from a config runs) and "grouped_mm" (what `from_pretrained` picks where it can).
Outputs are checked against the eager block before timing.

    python bench/moe.py [--threads N] [--quick] [--out bench/results/moe-cpu.txt]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/moe.py` puts bench/ first on sys.path, where bench/kernels.py would
# shadow the repository's `kernels` package: import from the repository root.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench.common import machine_name, markdown_table, print_report  # noqa: E402
from kernels import fused_moe_torch, reference  # noqa: E402

SEED = 0
BATCHES = (1, 8, 32, 128, 256)
MIN_SECONDS = 0.75  # timed rounds per case: until this much time has passed ...
MIN_CALLS, MAX_CALLS = 5, 50  # ... within these bounds
TOLERANCE = 1e-4

Layer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    renormalize: bool


SHAPES = (
    Shape("mixtral-like", hidden=512, intermediate=1408, experts=8, top_k=2, renormalize=True),
    Shape("qwen3-moe-like", hidden=512, intermediate=192, experts=64, top_k=8, renormalize=True),
)


def build_block(shape: Shape) -> torch.nn.Module:
    """Transformers' own sparse MoE block of this shape, random weights, eval mode."""
    if shape.name.startswith("mixtral"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(
            hidden_size=shape.hidden, intermediate_size=shape.intermediate,
            num_local_experts=shape.experts, num_experts_per_tok=shape.top_k,
        )  # fmt: skip
        block = MixtralSparseMoeBlock(config)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = Qwen3MoeConfig(
            hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
            num_experts=shape.experts, num_experts_per_tok=shape.top_k,
            norm_topk_prob=shape.renormalize,
        )  # fmt: skip
        block = Qwen3MoeSparseMoeBlock(config)
    # Expert weights are left uninitialised outside from_pretrained.
    for param in block.parameters():
        torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    return block.eval()


def pagedq_layer(block: torch.nn.Module, shape: Shape) -> Layer:
    router, w13, w2 = block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = reference.select_experts(
            F.linear(hidden, router), shape.top_k, shape.renormalize
        )
        return fused_moe_torch(hidden, w13, w2, weights, ids)

    return forward


def hf_layer(block: torch.nn.Module, experts: str) -> Layer:
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        block.experts.config._experts_implementation = experts
        return block(hidden[None])[0]

    return forward


def time_layers(layers: dict[str, Layer], hidden: torch.Tensor) -> dict[str, float]:
    """Median ms per call of each layer, after one warm-up call each. The layers take
    turns call by call, so that load from other processes falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    for layer in layers.values():
        layer(hidden)
    start = time.perf_counter()
    while len(times["pagedq"]) < MAX_CALLS and (
        len(times["pagedq"]) < MIN_CALLS or time.perf_counter() - start < MIN_SECONDS
    ):
        for name, layer in layers.items():
            t0 = time.perf_counter()
            layer(hidden)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out - expected).norm() / expected.norm())


def run_shape(shape: Shape, batches: tuple[int, ...]) -> list[list[object]]:
    torch.manual_seed(SEED)
    block = build_block(shape)
    layers = {
        "pagedq": pagedq_layer(block, shape),
        "eager": hf_layer(block, "eager"),
        "grouped_mm": hf_layer(block, "grouped_mm"),
    }
    rows = []
    with torch.inference_mode():
        for batch in batches:
            hidden = torch.randn(batch, shape.hidden)
            expected = layers["eager"](hidden)
            for name, layer in layers.items():
                error = relative_error(layer(hidden), expected)
                if error > TOLERANCE:
                    raise AssertionError(f"{shape.name} T={batch}: {name} off by {error:.1e}")
            ms = time_layers(layers, hidden)
            rows.append([
                shape.name, batch, f"{ms['pagedq']:.3f}", f"{ms['eager']:.3f}",
                f"{ms['grouped_mm']:.3f}", f"{ms['eager'] / ms['pagedq']:.2f}x",
                f"{ms['grouped_mm'] / ms['pagedq']:.2f}x",
            ])  # fmt: skip
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--quick", action="store_true", help="batch sizes 1 and 32 only")
    parser.add_argument("--out", type=Path, help="also write the printed report to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    batches = (1, 32) if args.quick else BATCHES
    rows = [row for shape in SHAPES for row in run_shape(shape, batches)]
    shapes = "; ".join(
        f"{s.name}: hidden {s.hidden}, intermediate {s.intermediate}, {s.experts} experts "
        f"top-{s.top_k}" for s in SHAPES
    )  # fmt: skip
    head = "\n".join([
        "# MoE layer on the CPU: pagedq torch path vs Transformers",
        "",
        f"- machine: {machine_name(torch.device('cpu'))}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32",
        f"- shapes: {shapes}; random weights (seed {SEED})",
        "- ms: median per call (router + routing + experts) on one batch of T tokens; the "
        "three take turns call by call",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; command: python {' '.join(sys.argv)}",
    ])  # fmt: skip
    table = markdown_table(
        ["shape", "T", "pagedq ms", "HF eager ms", "HF grouped_mm ms", "vs eager",
         "vs grouped_mm"],
        rows,
    )  # fmt: skip
    print_report(f"{head}\n\n{table}\n", args.out)


if __name__ == "__main__":
    main()
