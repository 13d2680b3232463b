"""CUDA greedy parity with Transformers in float32, on a random checkpoint of SmolLM2's shape
and on a small random checkpoint of every supported family (tests/engine/families.py:
sliding windows, soft-caps, q/k norms, longrope, experts through the Triton fused MoE).

Runs the engine three ways (triton eager, triton with decode CUDA graphs, torch
backend) with a batch of prompts, compares every token with Transformers'
`generate(do_sample=False)`. A difference is accepted only as a float-order tie:
at the first differing step, Transformers' token must be the engine's runner-up
with a logprob within --tie of the engine's choice (vLLM's comparison); every
other difference fails. Exits 1 on failure.

    python bench/gpu_parity.py [--prompts 8] [--tokens 32] [--families all|none|a,b]
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
from tests.engine.families import FAMILIES, VOCAB  # noqa: E402
from tests.engine.families import build as build_family  # noqa: E402


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


def check(path: Path, prompts: list[list[int]], tokens: int, tie: float) -> bool:
    """Every backend's tokens against Transformers'; prints a line each; True if all pass."""
    want = hf_greedy(path, prompts, tokens)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logprobs=2)
    failed = False
    for name, kwargs in [("triton+graphs", dict(attention_backend="triton")),
                         ("triton eager", dict(attention_backend="triton", enforce_eager=True)),
                         ("torch eager", dict(attention_backend="torch"))]:
        llm = LLM(str(path), dtype="float32", device="cuda", max_num_seqs=16,
                  gpu_memory_utilization=0.3, swap_space_gib=0.5, **kwargs)
        graphs = llm.engine.runner.graphs is not None
        outs = llm.generate(prompts, params, use_tqdm=False)
        verdicts = [compare(o, w, tie) for o, w in zip(outs, want, strict=True)]
        failed |= any(v.startswith("DIFF") for v in verdicts)
        exact = sum(v == "exact" for v in verdicts)
        print(f"  {name:14s} graphs={graphs} {exact}/{len(verdicts)} exact; "
              f"{' '.join(verdicts)}", flush=True)
        del llm, outs
        gc.collect()
        torch.cuda.empty_cache()
    return not failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tie", type=float, default=1e-3)
    parser.add_argument("--families", default="all",
                        help="families of tests/engine/families.py to check too: all, none "
                             f"or a comma list of {','.join(sorted(FAMILIES))}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_parity.py needs a CUDA GPU")
        return 1
    names = {"all": sorted(FAMILIES), "none": []}.get(args.families,
                                                      args.families.split(","))
    rng = random.Random(0)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        print("smollm2 shape", flush=True)
        path = build_random_checkpoint("smollm2", Path(tmp) / "smollm2", torch.float32,
                                       torch.device("cuda"))
        prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(3, 300))]
                   for _ in range(args.prompts)]
        ok &= check(path, prompts, args.tokens, args.tie)
        for name in names:
            print(name, flush=True)
            path = build_family(name, Path(tmp) / name, "cuda")
            prompts = [[rng.randrange(3, VOCAB) for _ in range(n)]
                       for n in FAMILIES[name].prompt_lengths]
            ok &= check(path, prompts, args.tokens, args.tie)
    print("CUDA parity:", "ok" if ok else "FAILED")
    return int(not ok)


if __name__ == "__main__":
    sys.exit(main())
