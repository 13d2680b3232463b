"""What copy-on-write sharing saves: peak KV blocks and throughput, in one run.

n = 4 sampling and beam width 4 over the same prompts, with sharing and with a
forced no-sharing mode (every fork copies every block), plus Transformers' beam
search on the same prompts. Prefix caching is off so only forking shares.

    python bench/sharing.py [--prompts 64] [--prompt-len 200] [--tokens 32] [--quick]
"""

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.common import machine_name, markdown_table, resolve_device, timed  # noqa: E402
from engine import LLM, BeamSearchParams, SamplingParams  # noqa: E402
from engine.model_loader import resolve_model_path  # noqa: E402


def run_engine(model: str, prompts: list[list[int]], params, share: bool, dtype: str,
               device: torch.device) -> tuple[float, int, int]:
    """(seconds, generated tokens, peak device blocks) for one engine run."""
    llm = LLM(model, dtype=dtype, device=str(device), enable_prefix_caching=False,
              share_blocks=share, max_num_seqs=256, max_num_batched_tokens=4096)
    if isinstance(params, BeamSearchParams):
        outs, seconds = timed(lambda: llm.beam_search(prompts, params), device)
    else:
        outs, seconds = timed(lambda: llm.generate(prompts, params, use_tqdm=False), device)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return seconds, tokens, llm.engine.stats().peak_device_blocks_used


def run_hf_beams(path: Path, prompts: list[list[int]], width: int, tokens: int, batch: int,
                 dtype: torch.dtype, device: torch.device) -> tuple[float, int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    def generate() -> int:
        produced = 0
        for i in range(0, len(prompts), batch):
            x = torch.tensor(prompts[i:i + batch], device=device)  # equal lengths: no padding
            with torch.inference_mode():
                y = model.generate(x, attention_mask=torch.ones_like(x), num_beams=width,
                                   num_return_sequences=width, do_sample=False,
                                   max_new_tokens=tokens, min_new_tokens=tokens,
                                   pad_token_id=0)
            produced += (y.shape[1] - x.shape[1]) * y.shape[0]
        return produced

    produced, seconds = timed(generate, device)
    return seconds, produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--hf-batch", type=int, default=16, help="prompts per HF generate call")
    parser.add_argument("--quick", action="store_true", help="8 prompts of 40 tokens, 8 new")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.prompt_len, args.tokens, args.hf_batch = 8, 40, 8, 4
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(args.prompt_len)]
               for _ in range(args.prompts)]
    model_path = resolve_model_path(args.model)
    model = str(model_path)
    sample = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=args.tokens,
                            ignore_eos=True)
    beams = BeamSearchParams(beam_width=4, max_tokens=args.tokens, ignore_eos=True)
    rows = []
    for name, params in (("n=4 sampling", sample), ("beam width 4", beams)):
        shared = run_engine(model, prompts, params, True, args.dtype, device)
        copied = run_engine(model, prompts, params, False, args.dtype, device)
        rows.append([name, copied[2], shared[2], f"{1 - shared[2] / copied[2]:.0%}",
                     f"{copied[1] / copied[0]:,.0f}", f"{shared[1] / shared[0]:,.0f}",
                     f"{copied[0] / shared[0]:.2f}x"])
        if params is beams:
            beam_seconds, beam_tokens = shared[0], shared[1]
    hf_seconds, hf_tokens = run_hf_beams(model_path, prompts, 4, args.tokens, args.hf_batch,
                                         dtype, device)
    table = markdown_table(
        ["workload", "peak blocks, no sharing", "peak blocks, sharing", "blocks saved",
         "tok/s, no sharing", "tok/s, sharing", "speed-up"], rows)
    beam_table = markdown_table(
        ["beam search (width 4)", "seconds", "tokens/s", "vs Transformers"],
        [["pagedq", f"{beam_seconds:.1f}", f"{beam_tokens / beam_seconds:,.0f}",
          f"{hf_seconds / beam_seconds:.2f}x"],
         ["Transformers", f"{hf_seconds:.1f}", f"{hf_tokens / hf_seconds:,.0f}", "1.00x"]])
    header = (f"{machine_name(device)}, torch {torch.__version__}, {args.dtype}; "
              f"{args.prompts} prompts x {args.prompt_len} tokens, {args.tokens} new tokens")
    text = f"{header}\n\n{table}\n\n{beam_table}\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
