"""Helpers shared by the benchmark scripts: the machine's name, timing, markdown
tables, progress lines, and randomly initialised checkpoints of known shapes."""

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

# Shapes of the random checkpoints (Llama architecture). "smollm2" is SmolLM2-135M's;
# "llama-1b" is a ~1.1B-parameter Llama (Llama-3.2-1B's body with a 32k vocabulary).
# "tiny" and "tiny-32k" are one small layer, so that a step's time is mostly host overhead.
RANDOM_MODELS: dict[str, dict] = {
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_parameters={"rope_theta": 100000.0,
                                                       "rope_type": "default"},
    ),
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096, rope_parameters={"rope_theta": 500000.0,
                                                       "rope_type": "default"},
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False,
        max_position_embeddings=2048, rope_parameters={"rope_theta": 10000.0,
                                                       "rope_type": "default"},
    ),
}
RANDOM_MODELS["tiny-32k"] = {**RANDOM_MODELS["tiny"], "vocab_size": 32000}
# Other families (issue 15's GPU workloads): "family" names Transformers' classes.
RANDOM_MODELS["qwen3-1b"] = dict(
    family="Qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
    tie_word_embeddings=True, max_position_embeddings=4096,
    rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
)
RANDOM_MODELS["mixtral-small"] = dict(
    family="Mixtral", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=8, head_dim=64, vocab_size=32000,
    num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
    max_position_embeddings=4096, rope_parameters={"rope_theta": 1000000.0,
                                                   "rope_type": "default"},
)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo) and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run fn once; return its result and its wall time in seconds (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
                 repeats: int = 50) -> float:
    """FLOP/s of a plain [m x k] @ [k x n] matmul (median of `repeats` timed runs)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(5):
        a @ b
    times = sorted(timed(lambda: a @ b, device)[1] for _ in range(repeats))
    return 2 * m * k * n / times[len(times) // 2]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats get 2 decimals unless already formatted as str."""
    def cell(value: object) -> str:
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def build_random_checkpoint(shape: str, path: Path, dtype: torch.dtype,
                            device: torch.device, seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint of a known shape (no tokenizer): Llama
    unless the shape names another family."""
    import transformers

    fields = dict(RANDOM_MODELS[shape])
    family = fields.pop("family", "Llama")
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    config = config_cls(**fields, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 1B parameters is much faster on a GPU
        model = model_cls(config).to(dtype)
    model.save_pretrained(path)
    return path


def log(message: str) -> None:
    """A timestamped progress line on stderr (stdout holds only the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_report(report: str, out: Path | None) -> None:
    """Print the report; with `out`, also write exactly what was printed there."""
    print(report, end="" if report.endswith("\n") else "\n", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report if report.endswith("\n") else report + "\n")


def parse_setting(text: str) -> tuple[str, str]:
    """An argparse type for `--set NAME=VALUE` (a worker or engine setting)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set wants NAME=VALUE, got {text!r}")
    return name, value
