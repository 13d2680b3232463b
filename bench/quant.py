"""Quantized weights, an FP8 KV cache and tensor parallelism against the plain engine.

(a) The 256-request workload of bench/throughput.py (random prompt and output
    lengths, greedy, EOS ignored) on one random checkpoint, once per mode: the model's
    dtype as it is, fp8 weights, int8 weights, an fp8 KV cache, and two
    tensor-parallel ranks where two GPUs are present. Per mode: output tokens/s, the
    KV pool's blocks and the weights' bytes, each with its ratio to the first mode,
    all measured in this run.
(b) The quantized GEMMs (CUDA only): int8 and 4-bit (AWQ and GPTQ layouts) Triton
    kernels against a bf16 matmul of the same shape at decode batch sizes.

    python bench/quant.py [--random-model qwen3-1b] [--quick] [--out FILE]
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/quant.py` puts bench/ first on sys.path, where bench/kernels.py would
# shadow the repository's `kernels` package: import from the repository root.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402

import kernels  # noqa: E402
from bench.common import (  # noqa: E402
    build_random_checkpoint,
    log,
    machine_name,
    markdown_table,
    print_report,
    resolve_device,
    timed,
)
from bench.throughput import (  # noqa: E402
    FULL,
    QUICK,
    fill_workload,
    rng_for,
    run_engine,
    workload_lengths,
)
from engine import LLM  # noqa: E402

MODES: dict[str, dict] = {
    "base": {},
    "fp8 weights": {"quantization": "fp8"},
    "int8 weights": {"quantization": "int8"},
    "fp8 KV cache": {"kv_cache_dtype": "fp8"},
    "TP=2": {"tensor_parallel_size": 2},
}
GEMM_BATCHES = (1, 8, 32, 64, 128, 256)
GROUP_SIZE = 128


def engine_modes(model: str, dtype: str, device: torch.device, quick: bool,
                 modes: list[str]) -> str:
    sizes = QUICK if quick else FULL
    lengths = workload_lengths(sizes, rng_for("workload"))
    output_tokens = sum(n for _, n in lengths)
    rows, base = [], None
    for name in modes:
        log(f"mode {name}")
        with LLM(model, dtype=dtype, device=str(device), max_num_seqs=256,
                 max_num_batched_tokens=4096, **MODES[name]) as llm:
            vocab = llm.engine.hf_config.vocab_size
            run_engine(llm, fill_workload(lengths[:8], vocab, rng_for("warm-up")))
            requests = fill_workload(lengths, vocab, rng_for(name))
            _, seconds = timed(partial(run_engine, llm, requests), device)
            stats = llm.engine.stats()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        figures = (output_tokens / seconds, stats.device_blocks_total, stats.weight_bytes)
        base = base or figures
        rows.append([name, f"{figures[0]:,.0f}", f"{figures[0] / base[0]:.2f}x",
                     f"{figures[1]:,}", f"{figures[1] / base[1]:.2f}x",
                     f"{figures[2] / 2**30:.2f}", f"{figures[2] / base[2]:.2f}x"])
    return markdown_table(["mode", "output tok/s", "vs base", "KV blocks", "vs base",
                           "weights GiB (rank 0)", "vs base"], rows)


def gemm_table(hidden: int, device: torch.device) -> str:
    """Median time of each kernel on [M, hidden] x [hidden, 4 * hidden] (random
    weights: the packed layouts' values do not change the work)."""
    k, n = hidden, 4 * hidden
    weight = torch.randn(n, k, dtype=torch.bfloat16, device=device)
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scale8 = torch.rand(n, device=device) / 100
    groups = k // GROUP_SIZE
    awq = (torch.randint(0, 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device),
           torch.randint(0, 2**31 - 1, (groups, n // 8), dtype=torch.int32, device=device),
           torch.rand(groups, n, dtype=torch.float16, device=device) / 100)
    gptq = (torch.randint(0, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device),
            awq[1], awq[2])
    rows = []
    for m in GEMM_BATCHES:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        cases = {
            "bf16": lambda: x @ weight.t(),  # noqa: B023
            "int8": lambda: kernels.int8_gemm(x, q8, scale8),  # noqa: B023
            "awq": lambda: kernels.awq_gemm(x, *awq, GROUP_SIZE),  # noqa: B023
            "gptq": lambda: kernels.gptq_gemm(x, *gptq, GROUP_SIZE),  # noqa: B023
        }
        times = {name: _median_time(fn, device) for name, fn in cases.items()}
        rows.append([m] + [f"{times[c] * 1e6:,.0f}" for c in cases]
                    + [f"{times['bf16'] / times[c]:.2f}x" for c in ("int8", "awq", "gptq")])
    return markdown_table(["M", "bf16 us", "int8 us", "awq us", "gptq us", "int8 speed-up",
                           "awq speed-up", "gptq speed-up"], rows)


def _median_time(fn, device: torch.device, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = sorted(timed(fn, device)[1] for _ in range(repeats))
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-model", default="qwen3-1b",
                        help="bench/common.py RANDOM_MODELS shape (default qwen3-1b)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default=None,
                        help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    modes = args.modes.split(",") if args.modes else [
        m for m in MODES if m != "TP=2" or torch.cuda.device_count() >= 2]
    with tempfile.TemporaryDirectory(prefix="pagedq-quant-") as tmp:
        log(f"building a random {args.random_model} checkpoint")
        model = str(build_random_checkpoint(args.random_model, Path(tmp), getattr(torch, dtype),
                                            device))
        hidden = json.loads((Path(model) / "config.json").read_text())["hidden_size"]
        report = [f"# Quantization, FP8 KV cache, tensor parallelism ({args.random_model})",
                  f"machine: {machine_name(device)}; dtype {dtype}; "
                  f"{time.strftime('%Y-%m-%d %H:%M')}; python " + " ".join(sys.argv), "",
                  "## (a) the workload per mode", "",
                  engine_modes(model, dtype, device, args.quick, modes), ""]
    if device.type == "cuda":
        report += [f"## (b) GEMMs [M, {hidden}] x [{hidden}, {4 * hidden}]", "",
                   gemm_table(hidden, device), ""]
    else:
        report += ["(b) the GEMM kernels are timed on CUDA only"]
    print_report("\n".join(report), args.out)


if __name__ == "__main__":
    main()
