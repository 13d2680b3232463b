"""Per-step host overhead of pagedq against Transformers' `generate`, in one run.

A random one-layer Llama (hidden 64, 4 heads over 2 KV heads, vocabulary 512, and a
32,000-token variant), float32, keeps the model's own work small, so a step's time is
mostly bookkeeping. Both systems time the same decode steps, those producing output
tokens T1+1 .. T2: pagedq as the wall time of `step()`, split by timing wrappers
installed for those steps only (scheduler.schedule, runner.prepare, the forward:
runner.execute less prepare, the sampler, and post-processing: the rest of the step);
Transformers as (t(T2) - t(T1)) / (T2 - T1) for `generate` with T1 and T2 new tokens
on the same prompts, so its prefill cancels out.

    python bench/step_overhead.py [--device cpu|cuda] [--quick] [--threads N]
                                  [--out bench/results/step-overhead-cpu.txt]
    python -m bench.step_overhead --quick
"""

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# `python bench/step_overhead.py` puts bench/ first on sys.path, where bench/kernels.py
# would shadow the repository's `kernels` package: import from the repository root.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench.common import (  # noqa: E402
    RANDOM_MODELS,
    build_random_checkpoint,
    log,
    machine_name,
    markdown_table,
    print_report,
    resolve_device,
    synchronize,
    timed,
)
from engine import (  # noqa: E402
    LLM,
    LLMEngine,
    RequestOutput,
    RequestOutputKind,
    SamplingParams,
)

SEED = 0
PROMPT_LEN = 32
FIRST_TOKEN_ID = 100  # prompts draw ids above the special tokens at the start of the vocab
PAD_ID = 0
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 8192  # 256 prompts of 32 tokens prefill in one step
NUM_DEVICE_BLOCKS = 16384      # 256 sequences of up to 1,024 tokens in blocks of 16

# The engine attributes wrapped for the timed steps: (owner under llm.engine, attribute,
# PhaseTimes field). runner.execute calls runner.prepare, so execute's time includes it.
HOOKS = (("scheduler", "schedule", "schedule"), ("runner", "prepare", "prepare"),
         ("runner", "execute", "execute"), ("", "sampler", "sample"))


@dataclass(frozen=True)
class Sizes:
    # T1, T2: both systems time the decode steps that produce output tokens T1+1 .. T2
    new_tokens: tuple[int, int]
    repeats: int  # runs per system, alternating; medians reported


FULL = Sizes(new_tokens=(8, 72), repeats=5)
QUICK = Sizes(new_tokens=(4, 36), repeats=3)


@dataclass(frozen=True)
class Case:
    name: str
    shape: str            # a RANDOM_MODELS key
    batch: int            # requests decoding in every timed step
    prefill_len: int = 0  # > 0: a fresh prompt of this length is prefilled in every timed step


CASES = (
    Case("decode B=1", "tiny", 1),
    Case("decode B=64", "tiny", 64),
    Case("decode B=256", "tiny", 256),
    Case("mixed: 64 decodes + 512-token prefill", "tiny", 64, prefill_len=512),
    Case("decode B=256, vocab 32k", "tiny-32k", 256),
)


@dataclass
class PhaseTimes:
    """Seconds spent over some steps: the whole `step()`, and the wrapped calls inside it."""
    step: float = 0.0
    schedule: float = 0.0
    prepare: float = 0.0
    execute: float = 0.0
    sample: float = 0.0

    def per_step(self, steps: int) -> "PhaseTimes":
        return PhaseTimes(**{f.name: getattr(self, f.name) / steps for f in fields(self)})


@dataclass(frozen=True)
class Row:
    case: Case
    engine_runs: list[PhaseTimes]  # seconds per step, in run order
    hf_runs: list[float]           # seconds per step, in run order

    @property
    def engine(self) -> PhaseTimes:
        """The median run (by step time), whose breakdown is reported."""
        return sorted(self.engine_runs, key=lambda t: t.step)[len(self.engine_runs) // 2]

    @property
    def hf_s(self) -> float:
        return statistics.median(self.hf_runs)

    def raw(self) -> str:
        """ms per step of every run, in run order."""
        return (f"{self.case.name}: pagedq "
                f"{', '.join(f'{t.step * 1e3:.2f}' for t in self.engine_runs)}; "
                f"transformers {', '.join(f'{s * 1e3:.2f}' for s in self.hf_runs)}")


# ---- timing wrappers ----------------------------------------------------------------


class Timed:
    """Stands in for a callable (a bound method or the sampler object): adds each call's
    wall time to `times.<field>` and forwards every other attribute to the original."""

    def __init__(self, inner: Callable, times: PhaseTimes, field: str,
                 device: torch.device) -> None:
        self.inner, self.times, self.field, self.device = inner, times, field, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            synchronize(self.device)
            setattr(self.times, self.field,
                    getattr(self.times, self.field) + time.perf_counter() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(vars(self)["inner"], name)


def hook_owner(engine: LLMEngine, owner: str, attr: str) -> Any:
    """The object holding `attr`; exits naming the attribute when the engine lacks it."""
    obj = getattr(engine, owner, None) if owner else engine
    if obj is None or not callable(getattr(obj, attr, None)):
        path = ".".join(["llm.engine", *([owner] if owner else []), attr])
        sys.exit(f"step_overhead: {path} is missing or not callable. This benchmark times "
                 "llm.engine.scheduler.schedule, llm.engine.runner.prepare, "
                 "llm.engine.runner.execute and llm.engine.sampler: update "
                 "bench/step_overhead.py to the engine's new layout.")
    return obj


@contextmanager
def instrumented(engine: LLMEngine, times: PhaseTimes, device: torch.device) -> Iterator[None]:
    """Wrap the HOOKS on their instances for the duration; restore them afterwards."""
    saved = []
    for owner, attr, field in HOOKS:
        obj = hook_owner(engine, owner, attr)
        saved.append((obj, attr, vars(obj).get(attr)))
        setattr(obj, attr, Timed(getattr(obj, attr), times, field, device))
    try:
        yield
    finally:
        for obj, attr, original in reversed(saved):
            if original is None:
                delattr(obj, attr)  # a method: the class's is visible again
            else:
                setattr(obj, attr, original)


# ---- pagedq -------------------------------------------------------------------------


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(length)]


def all_decoding(engine: LLMEngine, batch: int) -> bool:
    running = engine.scheduler.running
    return len(running) == batch and all(
        g.seqs[0].num_computed_tokens >= g.seqs[0].prompt_len for g in running)


def timed_step(engine: LLMEngine, times: PhaseTimes, device: torch.device
               ) -> list[RequestOutput]:
    synchronize(device)
    start = time.perf_counter()
    outputs = engine.step()
    synchronize(device)
    times.step += time.perf_counter() - start
    return outputs


def run_steps(engine: LLMEngine, case: Case, steps: int, times: PhaseTimes, rng: random.Random,
              vocab: int, ids: Iterator[int], device: torch.device) -> None:
    """`steps` steps of `case.batch` decodes; in a mixed case each step also prefills a
    fresh prompt of `case.prefill_len` tokens that asks for one token, so it finishes in
    that same step (added before the step, outside the timing)."""
    for _ in range(steps):
        if not all_decoding(engine, case.batch):
            raise RuntimeError(f"{case.name}: expected {case.batch} decoding requests, got "
                               f"{len(engine.scheduler.running)} running")
        fresh = None
        if case.prefill_len:
            fresh = f"prefill-{next(ids)}"
            engine.add_request(fresh, random_prompt(rng, case.prefill_len, vocab),
                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        outputs = timed_step(engine, times, device)
        if fresh and not any(o.request_id == fresh and o.finished for o in outputs):
            raise RuntimeError(f"{case.name}: the {case.prefill_len}-token prompt was not "
                               "prefilled in one step")


def step_until_decoding(engine: LLMEngine, case: Case) -> None:
    for _ in range(64):
        if all_decoding(engine, case.batch):
            return
        engine.step()
    raise RuntimeError(f"{case.name}: the {case.batch} prompts are still not all prefilled")


def engine_run(engine: LLMEngine, case: Case, prompts: list[list[int]], sizes: Sizes,
               rng: random.Random, ids: Iterator[int], device: torch.device) -> PhaseTimes:
    """Admit the requests and prefill them (output token 1), step untimed up to token T1,
    time the steps that produce tokens T1+1 .. T2, then drain. Seconds per timed step."""
    t1, t2 = sizes.new_tokens
    vocab = RANDOM_MODELS[case.shape]["vocab_size"]
    # One token past T2, so that nobody finishes in a timed step. Final outputs only, as
    # LLM.generate and the worker ask (a per-step report of every request is optional).
    params = SamplingParams(temperature=0, max_tokens=t2 + 1, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for prompt in prompts:
        engine.add_request(f"decode-{next(ids)}", prompt, params)
    step_until_decoding(engine, case)
    run_steps(engine, case, t1 - 1, PhaseTimes(), rng, vocab, ids, device)
    times = PhaseTimes()
    with instrumented(engine, times, device):
        run_steps(engine, case, t2 - t1, times, rng, vocab, ids, device)
    while engine.has_unfinished_requests():
        engine.step()
    return times.per_step(t2 - t1)


# ---- Transformers -------------------------------------------------------------------


def hf_generate_s(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int,
                  device: torch.device) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    out, seconds = timed(lambda: model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID), device)
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, "
                           f"asked for {new_tokens}")
    return seconds


def hf_run(model: torch.nn.Module, case: Case, prompts: list[list[int]], sizes: Sizes,
           rng: random.Random, device: torch.device) -> float:
    """Seconds per decode step, (t(T2) - t(T1)) / (T2 - T1); a mixed case adds one
    `generate` of one token after a fresh prompt of its prefill length."""
    t1, t2 = sizes.new_tokens
    short = hf_generate_s(model, prompts, t1, device)
    seconds = (hf_generate_s(model, prompts, t2, device) - short) / (t2 - t1)
    if case.prefill_len:
        vocab = RANDOM_MODELS[case.shape]["vocab_size"]
        seconds += hf_generate_s(model, [random_prompt(rng, case.prefill_len, vocab)], 1,
                                 device)
    return seconds


# ---- the run ------------------------------------------------------------------------


def run_shape(shape: str, cases: list[Case], sizes: Sizes, device: torch.device,
              tmp: Path) -> list[Row]:
    path = build_random_checkpoint(shape, tmp / shape, torch.float32, device, SEED)
    llm = LLM(model=str(path), dtype="float32", device=str(device), max_num_seqs=MAX_NUM_SEQS,
              max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
              num_device_blocks=NUM_DEVICE_BLOCKS, enable_prefix_caching=False)
    for owner, attr, _ in HOOKS:  # fail before timing anything
        hook_owner(llm.engine, owner, attr)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    # No EOS, so no row stops early; min_new_tokens alone would instead mask the EOS
    # logit of every row at every step (a torch.where over the whole vocabulary).
    hf.generation_config.eos_token_id = None
    ids = itertools.count()
    return [measure_case(llm.engine, hf, case, sizes, ids, device) for case in cases]


def alternating(repeat: int) -> tuple[str, str]:
    """Run order in a repeat: AB, BA, AB, ..., so drift on a busy machine hits both alike."""
    return ("pagedq", "transformers") if repeat % 2 == 0 else ("transformers", "pagedq")


def measure_case(engine: LLMEngine, hf: torch.nn.Module, case: Case, sizes: Sizes,
                 ids: Iterator[int], device: torch.device) -> Row:
    """Both systems on the same prompts, `sizes.repeats` runs each, alternating (ABBA)."""
    rng = random.Random(f"{SEED}-{case.name}")
    vocab = RANDOM_MODELS[case.shape]["vocab_size"]
    prompts = [random_prompt(rng, PROMPT_LEN, vocab) for _ in range(case.batch)]
    hf_run(hf, case, prompts, sizes, rng, device)  # warm-up (pagedq's are in each run)
    engine_runs: list[PhaseTimes] = []
    hf_runs: list[float] = []
    for r in range(sizes.repeats):
        for system in alternating(r):
            if system == "pagedq":
                engine_runs.append(engine_run(engine, case, prompts, sizes, rng, ids, device))
            else:
                hf_runs.append(hf_run(hf, case, prompts, sizes, rng, device))
    row = Row(case, engine_runs, hf_runs)
    log(f"ms/step per run, {row.raw()}")
    return row


def breakdown(t: PhaseTimes) -> tuple[float, float, float, float, float]:
    """schedule, prepare, forward, sample, post: the parts of a step, summing to it."""
    post = t.step - t.schedule - t.execute - t.sample
    return t.schedule, t.prepare, t.execute - t.prepare, t.sample, post


def render(header: dict[str, str], rows: list[Row], sizes: Sizes) -> str:
    head = "\n".join(f"- {key}: {value}" for key, value in header.items())
    table = markdown_table(
        ["case", "pagedq ms/step", "Transformers ms/step", "Transformers / pagedq",
         "schedule", "prepare", "forward", "sample", "post"],
        [(r.case.name, *(s * 1e3 for s in (r.engine.step, r.hf_s)),
          f"{r.hf_s / r.engine.step:.2f}x", *(s * 1e3 for s in breakdown(r.engine)))
         for r in rows])
    t1, t2 = sizes.new_tokens
    notes = [
        f"Both systems: the decode steps that produce output tokens {t1 + 1} to {t2} of B "
        f"{PROMPT_LEN}-token prompts, {sizes.repeats} runs each, the two systems "
        "alternating (ABBA); medians. A ratio above 1x means pagedq's step is faster.",
        f"pagedq: each run admits the B requests, prefills them in one step (token 1), "
        f"steps untimed to token {t1}, then times `llm.engine.step()` over the next "
        f"{t2 - t1} steps. The breakdown is the median run's: scheduler.schedule, "
        "runner.prepare, the forward and logits (runner.execute less prepare), the sampler, "
        "and post, the rest of step() (applying tokens, stop checks, freeing, outputs). "
        "Requests ask for final outputs only (RequestOutputKind.FINAL_ONLY), as "
        "LLM.generate and the worker do"
        + ("; CUDA is synchronised around each timed call." if header["device"] != "cpu"
           else "."),
        "mixed: before each step a fresh 512-token prompt asking for one token is added "
        "(untimed); the step runs the 64 decodes and that whole prompt's prefill (576 "
        "tokens), samples 65 rows and finishes the new request. Transformers cannot add a "
        "prompt to a running batch: its figure is its batch-64 decode step plus `generate` "
        "of one token after a 512-token prompt (one prefill, with generate's set-up).",
        f"Transformers: `generate` on the same prompts as one [B, {PROMPT_LEN}] batch "
        f"(greedy, attention mask of ones); ms per step = (t({t2}) - t({t1})) / "
        f"({t2} - {t1}), so its prefill cancels out. EOS is cleared from its generation "
        "config (pagedq: ignore_eos), and min_new_tokens = max_new_tokens.",
    ]
    raw = "\n".join(f"- {r.raw()}" for r in rows)
    return "\n\n".join([head, table, "\n".join(f"- {n}" for n in notes),
                        "**Raw runs** (ms per step, in run order)", raw]) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N] or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the model is too small to "
                             "gain from more, and on a shared core a second one spins)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and repeats, for a smoke run")
    parser.add_argument("--out", type=Path, help="also write the printed report to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    sizes = QUICK if args.quick else FULL
    rows = []
    with tempfile.TemporaryDirectory(prefix="pagedq-step-") as tmp:
        for shape in dict.fromkeys(c.shape for c in CASES):
            log(f"random {shape} checkpoint on {device}")
            rows += run_shape(shape, [c for c in CASES if c.shape == shape], sizes, device,
                              Path(tmp))
    m = RANDOM_MODELS["tiny"]
    header = {
        "machine": machine_name(device),
        "torch": f"{torch.__version__}, {torch.get_num_threads()} CPU threads",
        "device": str(device),
        "model": f"random Llama, {m['num_hidden_layers']} layer, hidden {m['hidden_size']}, "
                 f"intermediate {m['intermediate_size']}, {m['num_attention_heads']} heads "
                 f"over {m['num_key_value_heads']} KV heads, vocabulary {m['vocab_size']} "
                 f"(or {RANDOM_MODELS['tiny-32k']['vocab_size']:,}), float32",
        "requests": f"{PROMPT_LEN}-token random prompts (seed {SEED}), greedy, EOS ignored, "
                    "no prefix caching",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python " + " ".join(sys.argv),
    }
    print_report(render(header, rows, sizes), args.out)


if __name__ == "__main__":
    main()
