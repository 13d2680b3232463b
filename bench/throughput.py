"""Throughput of pagedq against Hugging Face Transformers' `generate`, in one process.

Same model, prompts (random token ids), output lengths and dtype for both; greedy,
EOS ignored so every request produces exactly the tokens it asked for. Every timed run
draws fresh prompts, so pagedq's prefix cache (on, the engine's default) never hits.
Prints:
  (a) the seed's table: wall time of one batch of B prompts x 128 new tokens;
  (b) a 256-request workload with seeded random prompt (16-512) and output (16-256)
      lengths; Transformers runs it in static batches (left padding, each batch runs to
      its longest output; only the requested tokens count as output) of the size that
      was fastest in a sweep; the two systems alternate (ABBA) over the repeats;
  (c) achieved FLOP/s on (b) as a fraction of a plain matmul's FLOP/s in the same run.

    python bench/throughput.py [--quick] [--random-model SHAPE]  (bench/common.py RANDOM_MODELS)
                               [--out bench/results/throughput-cpu.md]
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/throughput.py` puts bench/ first on sys.path, where bench/kernels.py
# would shadow the repository's `kernels` package: import from the repository root.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PretrainedConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench.common import (  # noqa: E402
    RANDOM_MODELS,
    build_random_checkpoint,
    log,
    machine_name,
    markdown_table,
    matmul_flops,
    print_report,
    resolve_device,
    timed,
)
from engine import LLM, SamplingParams  # noqa: E402

SEED = 0
FIRST_TOKEN_ID = 100  # prompts draw ids above the special tokens at the start of the vocab
PAD_ID = 0
MAX_NUM_BATCHED_TOKENS = 8192
GPU_MEMORY_UTILIZATION = 0.6  # Transformers shares the GPU with the engine in this process


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...]        # (a) batch sizes
    new_tokens: int                 # (a) tokens generated per prompt
    prompt_len: int                 # (a) tokens per prompt
    requests: int                   # (b) number of requests
    prompt_lens: tuple[int, int]    # (b) inclusive range of prompt lengths
    output_lens: tuple[int, int]    # (b) inclusive range of output lengths
    hf_batches: tuple[int, ...]     # (b) Transformers' static batch sizes to sweep


FULL = Sizes((4, 8, 16, 32), 128, 32, 256, (16, 512), (16, 256), (16, 32, 64, 128, 256))
QUICK = Sizes((2, 4), 16, 16, 12, (16, 64), (4, 32), (4, 12))


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


@dataclass(frozen=True)
class LatencyRow:
    batch: int
    engine_runs: list[float]  # seconds, in run order
    hf_runs: list[float]

    @property
    def engine_s(self) -> float:
        return statistics.median(self.engine_runs)

    @property
    def hf_s(self) -> float:
        return statistics.median(self.hf_runs)


@dataclass(frozen=True)
class WorkloadResult:
    requests: list[Request]          # the first timed variant (all share the lengths)
    hf_sweep: dict[int, float | None]  # batch size -> seconds (None: out of memory)
    hf_batch: int                    # the sweep's fastest, used for the timed runs
    runs: list[tuple[str, float]]    # (system, seconds) of each timed run, in run order
    engine_preemptions: list[int]    # per timed pagedq run

    @property
    def engine_runs(self) -> list[float]:
        return [seconds for name, seconds in self.runs if name == "pagedq"]

    @property
    def engine_s(self) -> float:
        return statistics.median(self.engine_runs)

    @property
    def hf_s(self) -> float:
        return statistics.median(seconds for name, seconds in self.runs
                                 if name == "transformers")

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)


# ---- prompts --------------------------------------------------------------------


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(length)]


def rng_for(purpose: str) -> random.Random:
    """A generator of its own per purpose, so that no draw shifts another's."""
    return random.Random(f"{SEED}-{purpose}")


def workload_lengths(sizes: Sizes, rng: random.Random) -> list[tuple[int, int]]:
    """(prompt length, output length) of each request of workload (b)."""
    return [(rng.randint(*sizes.prompt_lens), rng.randint(*sizes.output_lens))
            for _ in range(sizes.requests)]


def fill_workload(lengths: list[tuple[int, int]], vocab: int,
                  rng: random.Random) -> list[Request]:
    """A variant of the workload: the same lengths, fresh prompt tokens."""
    return [Request(random_prompt(rng, prompt_len, vocab), output_len)
            for prompt_len, output_len in lengths]


# ---- the two systems --------------------------------------------------------------


def run_engine(llm: LLM, requests: list[Request]) -> None:
    """All requests in one `generate` call; the engine batches them continuously."""
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    outs = llm.generate([r.prompt for r in requests], params, use_tqdm=False)
    produced = [len(o.outputs[0].token_ids) for o in outs]
    if produced != [r.output_len for r in requests]:
        raise RuntimeError(f"engine produced {produced} tokens, asked for "
                           f"{[r.output_len for r in requests]}")


def run_hf_batch(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> None:
    """One static batch: prompts padded on the left, every row generates `new_tokens`."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=PAD_ID)
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, "
                           f"asked for {new_tokens}")


def run_hf(model: torch.nn.Module, requests: list[Request], batch_size: int) -> None:
    """Static batches in arrival order; each runs until its longest output is done."""
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        run_hf_batch(model, [r.prompt for r in batch], max(r.output_len for r in batch))


def load_hf(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    hf_logging.set_verbosity_error()  # generation-config chatter
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    # No EOS, so no row stops early (pagedq: ignore_eos); min_new_tokens alone would
    # instead mask the EOS logit of every row at every step, over the whole vocabulary.
    model.generation_config.eos_token_id = None
    return model


# ---- measurements ---------------------------------------------------------------


def warm_up(llm: LLM, hf: torch.nn.Module, sizes: Sizes, vocab: int,
            rng: random.Random) -> None:
    """Keep one-time costs out of the timings: the engine runs every row of the table
    once (on a GPU each batch size and context may compile its own Triton kernel
    variant); Transformers runs one small batch."""
    for b in sizes.batches:
        run_engine(llm, [Request(random_prompt(rng, sizes.prompt_len, vocab), sizes.new_tokens)
                         for _ in range(b)])
    run_hf_batch(hf, [random_prompt(rng, sizes.prompt_len, vocab)] * 2, 4)


def alternating(repeat: int) -> tuple[str, str]:
    """Run order of the two systems in a repeat: AB, BA, AB, ... (ABBA over pairs), so
    drift on a noisy machine hits both alike."""
    return ("pagedq", "transformers") if repeat % 2 == 0 else ("transformers", "pagedq")


def measure_latency(llm: LLM, hf: torch.nn.Module, sizes: Sizes, vocab: int,
                    device: torch.device, repeats: int) -> list[LatencyRow]:
    """(a): B prompts through both systems, B from the table's batch sizes.

    Each row is the median of `repeats` runs, each on fresh prompts (so pagedq's prefix
    cache never hits) that both systems share, in alternating order."""
    rng = rng_for("latency")
    rows = []
    for b in sizes.batches:
        times: dict[str, list[float]] = {"pagedq": [], "transformers": []}
        for r in range(repeats):
            requests = [Request(random_prompt(rng, sizes.prompt_len, vocab), sizes.new_tokens)
                        for _ in range(b)]
            systems = {"pagedq": lambda: run_engine(llm, requests),  # noqa: B023
                       "transformers": lambda: run_hf(hf, requests, b)}  # noqa: B023
            for name in alternating(r):
                times[name].append(timed(systems[name], device)[1])
        row = LatencyRow(b, times["pagedq"], times["transformers"])
        log(f"(a) B={b}: pagedq {row.engine_s:.2f} s, transformers {row.hf_s:.2f} s "
            f"(medians of {repeats})")
        rows.append(row)
    return rows


def sweep_hf_batch(hf: torch.nn.Module, requests: list[Request], batch_sizes: list[int],
                   device: torch.device) -> dict[int, float | None]:
    """One run of the workload per static batch size; None where it ran out of memory."""
    sweep: dict[int, float | None] = {}
    for b in batch_sizes:
        try:
            sweep[b] = timed(lambda: run_hf(hf, requests, b), device)[1]  # noqa: B023
        except torch.OutOfMemoryError:
            sweep[b] = None
            torch.cuda.empty_cache()
        log(f"(b) transformers sweep, static batches of {b}: "
            + (f"{sweep[b]:.2f} s" if sweep[b] is not None else "out of memory"))
    return sweep


def measure_workload(llm: LLM, hf: torch.nn.Module, sizes: Sizes, vocab: int,
                     device: torch.device, repeats: int) -> WorkloadResult:
    """(b): the seeded workload. Its lengths come from random.Random(SEED) alone; each
    run gets fresh prompt tokens. First, untimed for pagedq and as a sweep for
    Transformers, a warm-up variant; then `repeats` timed variants, both systems on
    each, in alternating order."""
    rng = random.Random(SEED)
    lengths = workload_lengths(sizes, rng)
    warm = fill_workload(lengths, vocab, rng_for("workload-warm-up"))
    run_engine(llm, warm)
    batch_sizes = sorted({min(b, sizes.requests) for b in sizes.hf_batches})
    sweep = sweep_hf_batch(hf, warm, batch_sizes, device)
    fitting = {b: s for b, s in sweep.items() if s is not None}
    if not fitting:
        raise RuntimeError(f"transformers ran out of memory at every batch size {batch_sizes}")
    hf_batch = min(fitting, key=fitting.__getitem__)
    variants = [fill_workload(lengths, vocab, rng) for _ in range(repeats)]
    runs, preemptions = [], []
    for r, requests in enumerate(variants):
        for name in alternating(r):
            if name == "pagedq":
                before = llm.engine.stats().num_preemptions
                seconds = timed(lambda: run_engine(llm, requests), device)[1]  # noqa: B023
                preemptions.append(llm.engine.stats().num_preemptions - before)
            else:
                seconds = timed(lambda: run_hf(hf, requests, hf_batch), device)[1]  # noqa: B023
            runs.append((name, seconds))
            log(f"(b) run {r + 1}/{repeats}, {name}: {seconds:.2f} s")
    return WorkloadResult(variants[0], sweep, hf_batch, runs, preemptions)


def workload_flops(config: PretrainedConfig, requests: list[Request]) -> float:
    """Useful FLOPs of a workload: 2 x weights x tokens through the decoder layers,
    the LM head on every sampled position, and causal attention (QK^T and PV) without
    padding. A request's prompt and all but its last output token pass the model."""
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q_size, kv_size = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    layer_weights = (c.hidden_size * (q_size + 2 * kv_size) + q_size * c.hidden_size
                     + 3 * c.hidden_size * c.intermediate_size)
    total = 0.0
    for r in requests:
        tokens = len(r.prompt) + r.output_len - 1
        total += 2 * c.num_hidden_layers * layer_weights * tokens
        total += 2 * c.hidden_size * c.vocab_size * r.output_len
        total += c.num_hidden_layers * 4 * q_size * tokens * (tokens + 1) / 2
    return total


# ---- report ---------------------------------------------------------------------


def render(header: dict[str, str], sizes: Sizes, latency: list[LatencyRow],
           work: WorkloadResult, flops: float, matmul: float, repeats: int) -> str:
    head = "\n".join(f"- {key}: {value}" for key, value in header.items())
    table_a = markdown_table(
        ["batch", "pagedq (s)", "transformers (s)", "transformers / pagedq"],
        [(r.batch, r.engine_s, r.hf_s, f"{r.hf_s / r.engine_s:.2f}x") for r in latency],
    )
    out_tokens = work.output_tokens
    table_b = markdown_table(
        ["system", "time (s)", "output tok/s", "total tok/s", "vs transformers"],
        [("pagedq", work.engine_s, out_tokens / work.engine_s,
          (out_tokens + work.prompt_tokens) / work.engine_s, f"{work.hf_s / work.engine_s:.2f}x"),
         (f"transformers (static batches of {work.hf_batch}, the sweep's fastest)", work.hf_s,
          out_tokens / work.hf_s, (out_tokens + work.prompt_tokens) / work.hf_s, "1.00x")],
    )
    table_c = markdown_table(
        ["system", "achieved GFLOP/s", "fraction of matmul"],
        [("pagedq", flops / work.engine_s / 1e9, f"{flops / work.engine_s / matmul:.1%}"),
         ("transformers", flops / work.hf_s / 1e9, f"{flops / work.hf_s / matmul:.1%}")],
    )
    prompt_lens = [len(r.prompt) for r in work.requests]
    output_lens = [r.output_len for r in work.requests]
    sweep = ", ".join(f"{b}: " + (f"{s:.3f} s" if s is not None else "out of memory")
                      for b, s in work.hf_sweep.items())
    return "\n\n".join([
        head,
        f"**(a) One batch of B prompts x {sizes.new_tokens} new tokens** "
        f"({sizes.prompt_len}-token prompts, greedy, EOS ignored; wall time, median of "
        f"{repeats} alternating runs, each on fresh prompts)",
        table_a,
        f"**(b) {len(work.requests)}-request workload** (prompts "
        f"{min(prompt_lens)}-{max(prompt_lens)} tokens, mean {statistics.mean(prompt_lens):.0f}; "
        f"outputs {min(output_lens)}-{max(output_lens)}, mean "
        f"{statistics.mean(output_lens):.0f}; {out_tokens} output tokens; lengths from "
        f"random.Random({SEED}), fresh prompt tokens per run; median of "
        f"{len(work.engine_runs)} runs per system in alternating order; Transformers' batch "
        f"size is the fastest of a sweep; pagedq preemptions per run: "
        f"{work.engine_preemptions})",
        table_b,
        f"**(c) FLOP/s on (b)** ({flops / 1e12:.2f} useful TFLOP; plain matmul "
        f"{matmul / 1e9:.0f} GFLOP/s)",
        table_c,
        "**Raw timings** (seconds, in run order)",
        "\n".join([*(f"- (a) B={r.batch}: pagedq {fmt_runs(r.engine_runs)}; transformers "
                      f"{fmt_runs(r.hf_runs)}" for r in latency),
                   f"- (b) Transformers batch-size sweep (one run each on an untimed variant "
                   f"of the workload): {sweep}",
                   "- (b) timed runs: " + ", ".join(f"{name} {s:.3f}" for name, s in work.runs)]),
    ]) + "\n"


def fmt_runs(runs: list[float]) -> str:
    return ", ".join(f"{s:.3f}" for s in runs)


# ---- main -----------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help="built-in model name or checkpoint folder")
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS),
                        help="time a randomly initialised checkpoint of this shape instead")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--requests", type=int, help="workload (b) size (default 256)")
    parser.add_argument("--batches", help="table (a) batch sizes (default 4,8,16,32)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per table (a) row, the median reported (default 3)")
    parser.add_argument("--workload-repeats", type=int, default=2,
                        help="timed runs of workload (b) per system, in alternating order, "
                             "the median reported (default 2)")
    parser.add_argument("--hf-batches",
                        help="Transformers' static batch sizes to sweep on workload (b) "
                             "(default 16,32,64,128,256; --quick: 4,12)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--out", type=Path,
                        help="also write the printed report to this markdown file")
    return parser.parse_args()


def int_list(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(",")) if text else default


def choose_sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    return replace(sizes, batches=int_list(args.batches, sizes.batches),
                   hf_batches=int_list(args.hf_batches, sizes.hf_batches),
                   requests=args.requests or sizes.requests)


def run(args: argparse.Namespace, model: str, dtype: torch.dtype,
        device: torch.device) -> str:
    sizes = choose_sizes(args)
    log(f"loading {model} ({dtype}, {device})")
    llm = LLM(model, dtype=str(dtype).removeprefix("torch."), device=str(device),
              max_num_seqs=256, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
              gpu_memory_utilization=GPU_MEMORY_UTILIZATION)
    hf = load_hf(Path(llm.model_path), dtype, device)
    config = hf.config
    warm_up(llm, hf, sizes, config.vocab_size, rng_for("warm-up"))
    latency = measure_latency(llm, hf, sizes, config.vocab_size, device, args.repeats)
    work = measure_workload(llm, hf, sizes, config.vocab_size, device, args.workload_repeats)
    matmul = matmul_flops(256, config.hidden_size, 4 * config.hidden_size, dtype, device)
    header = {
        "machine": machine_name(device),
        "torch": f"{torch.__version__}, {torch.get_num_threads()} CPU threads",
        "dtype": str(dtype).removeprefix("torch."),
        "model": f"random {args.random_model} checkpoint" if args.random_model else model,
        "parameters": f"{sum(p.numel() for p in hf.parameters()) / 1e6:,.1f} M",
        "prefix caching": f"{'on' if llm.engine.config.enable_prefix_caching else 'off'} "
                          f"(the engine's default); hit rate over the whole run "
                          f"{llm.engine.stats().prefix_cache_hit_rate:.1%}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python " + " ".join(sys.argv),
    }
    return render(header, sizes, latency, work, workload_flops(config, work.requests), matmul,
                  args.repeats)


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    with tempfile.TemporaryDirectory(prefix="pagedq-random-") as tmp:
        model = args.model
        if args.random_model:
            log(f"building a random {args.random_model} checkpoint in {tmp}")
            model = str(build_random_checkpoint(args.random_model, Path(tmp), dtype, device))
        report = run(args, model, dtype, device)
    print_report(report, args.out)


if __name__ == "__main__":
    main()
