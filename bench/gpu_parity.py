"""CUDA greedy parity with Transformers in float32, on a random checkpoint of SmolLM2's shape.

Runs the engine three ways (triton eager, triton with decode CUDA graphs, torch
backend) with a batch of prompts, compares every token with Transformers'
`generate(do_sample=False)`. A difference is accepted only as a float-order tie:
at the first differing step, Transformers' token must be the engine's runner-up
with a logprob within --tie of the engine's choice (vLLM's comparison); every
other difference fails. Exits 1 on failure.

    python bench/gpu_parity.py [--prompts 8] [--tokens 32]
"""

import argparse
import gc
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.common import build_random_checkpoint  # noqa: E402
from engine import LLM, RequestOutput, SamplingParams  # noqa: E402


def hf_greedy(path: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    del model
    torch.cuda.empty_cache()
    return outs


def compare(out: RequestOutput, want: list[int], tie: float) -> str:
    """'exact', 'tie@i' or 'DIFF@i'."""
    got = out.outputs[0]
    for i, (g, w) in enumerate(zip(got.token_ids, want, strict=True)):
        if g != w:
            top = got.logprobs[i]
            close = w in top and abs(top[g] - top[w]) <= tie
            return f"tie@{i}" if close else f"DIFF@{i}"
    return "exact"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tie", type=float, default=1e-3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_parity.py needs a CUDA GPU")
        return 1
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(3, 300))]
               for _ in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_random_checkpoint("smollm2", Path(tmp), torch.float32, torch.device("cuda"))
        want = hf_greedy(path, prompts, args.tokens)
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True,
                                logprobs=2)
        failed = False
        for name, kwargs in [("triton+graphs", dict(attention_backend="triton")),
                             ("triton eager", dict(attention_backend="triton",
                                                   enforce_eager=True)),
                             ("torch eager", dict(attention_backend="torch"))]:
            llm = LLM(str(path), dtype="float32", device="cuda", max_num_seqs=16,
                      gpu_memory_utilization=0.3, swap_space_gib=0.5, **kwargs)
            graphs = llm.engine.runner.graphs is not None
            outs = llm.generate(prompts, params, use_tqdm=False)
            verdicts = [compare(o, w, args.tie) for o, w in zip(outs, want, strict=True)]
            failed |= any(v.startswith("DIFF") for v in verdicts)
            exact = sum(v == "exact" for v in verdicts)
            print(f"{name:14s} graphs={graphs} {exact}/{len(verdicts)} exact; "
                  f"{' '.join(verdicts)}")
            del llm, outs
            gc.collect()
            torch.cuda.empty_cache()
    print("CUDA parity:", "FAILED" if failed else "ok")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
