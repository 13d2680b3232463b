"""What quantization costs in quality, on SmolLM2-135M's real weights: greedy agreement
with float32 and the perplexity of examples/docs.jsonl, beside weight bytes and KV blocks.

Modes: float32 (the reference), int8 and fp8 weights quantized at load, an fp8 KV cache.
Agreement counts each prompt's generated tokens up to its first divergence from
float32's (after one, the contexts differ and later tokens compare nothing).

    python bench/quant_quality.py [--modes float32 int8 fp8 fp8-kv] [--prompts 32]
                                  [--tokens 32] [--out FILE]
"""

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402

from bench.common import machine_name, markdown_table  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402

DOCS = ROOT / "examples" / "docs.jsonl"
# Each mode's LLM arguments beyond the model, dtype and device.
MODES: dict[str, dict[str, str]] = {
    "float32": {},
    "int8": {"quantization": "int8"},
    "fp8": {"quantization": "fp8"},
    "fp8-kv": {"kv_cache_dtype": "fp8"},
}


@dataclass(slots=True)
class Quality:
    mode: str
    tokens: list[list[int]]  # each prompt's greedy continuation
    perplexity: float
    weight_bytes: int
    device_blocks_total: int
    seconds: float


def load_docs(count: int | None = None) -> list[str]:
    docs = [json.loads(line)["text"] for line in DOCS.read_text().splitlines() if line.strip()]
    return docs[:count]


def sentence_prompts(docs: list[str], count: int) -> list[str]:
    """The docs' sentences, the first `count` of them: short prompts on varied topics."""
    sentences = [s for doc in docs for s in re.split(r"(?<=[.!?])\s+", doc) if s]
    if len(sentences) < count:
        raise ValueError(f"{DOCS} has {len(sentences)} sentences, fewer than {count} prompts")
    return sentences[:count]


def greedy(llm: LLM, prompts: list[str], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def perplexity(llm: LLM, docs: list[str]) -> float:
    """exp of the mean negative log-likelihood of every doc token after each doc's first
    (which has no context), all docs' tokens pooled."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    logprobs = [position[token].logprob
                for out in llm.generate(docs, params, use_tqdm=False)
                for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:],
                                           strict=True)]
    return math.exp(-sum(logprobs) / len(logprobs))


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> tuple[float, int]:
    """(the fraction of generated tokens equal to the reference's up to each prompt's
    first divergence, the number of prompts identical throughout)."""
    matched = identical = 0
    for want, got in zip(reference, tokens, strict=True):
        # ignore_eos: every continuation has the same length.
        prefix = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b),
                      len(want))
        matched += prefix
        identical += prefix == len(want)
    return matched / sum(len(want) for want in reference), identical


def measure(model: str, mode: str, prompts: list[str], docs: list[str], tokens: int,
            dtype: str = "float32", device: str = "cpu") -> Quality:
    start = time.perf_counter()
    llm = LLM(model, dtype=dtype, device=device, swap_space_gib=0.01, **MODES[mode])
    generated = greedy(llm, prompts, tokens)
    ppl = perplexity(llm, docs)
    stats = llm.engine.stats()
    return Quality(mode, generated, ppl, stats.weight_bytes, stats.device_blocks_total,
                   time.perf_counter() - start)


def table(results: list[Quality]) -> str:
    base = results[0]
    rows = []
    for r in results:
        matched, identical = agreement(base.tokens, r.tokens)
        rows.append([r.mode, f"{matched:.1%}", f"{identical}/{len(r.tokens)}",
                     f"{r.perplexity:.3f}", f"{r.perplexity / base.perplexity - 1:+.2%}",
                     f"{r.weight_bytes / 2**20:,.1f}", f"{r.device_blocks_total:,}",
                     f"{r.seconds:.0f}"])
    return markdown_table(["mode", "tokens agreeing", "prompts identical", "perplexity",
                           f"vs {base.mode}", "weights MiB", "KV blocks", "seconds"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="the first is the reference the others are compared with")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    docs = load_docs()
    prompts = sentence_prompts(docs, args.prompts)
    results = []
    for mode in args.modes:
        results.append(measure(args.model, mode, prompts, docs, args.tokens, args.dtype,
                               args.device))
        print(f"{mode}: done in {results[-1].seconds:.0f} s", file=sys.stderr)
    header = (f"{args.model}, {args.dtype} on {machine_name(torch.device(args.device))}, "
              f"torch {torch.__version__}; {len(prompts)} prompts x {args.tokens} greedy "
              f"tokens (ignore_eos), perplexity over {len(docs)} docs of {DOCS.name}")
    text = f"{header}\n\n{table(results)}\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
