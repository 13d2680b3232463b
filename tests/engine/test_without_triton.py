"""Triton is Linux-only: without it the engine still imports, and the torch backend
serves, swapping included. Each check runs in a fresh interpreter where importing
triton fails."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NO_TRITON = "import sys; sys.modules['triton'] = None\n"

# Two greedy requests on the torch backend, once in a pool too small for both (they
# preempt each other by swapping) and once in an ample one; prints what they produced.
SERVE = """
import json
import torch
from engine import EngineConfig, LLMEngine, SamplingParams

torch.set_num_threads(1)  # a tiny model gains nothing from threads on a loaded machine

def run(model, device_blocks):
    engine = LLMEngine(EngineConfig(
        model=model, dtype="float32", device="cpu", attention_backend="torch",
        num_device_blocks=device_blocks, swap_space_gib=0.001, max_model_len=64))
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("a", "The first request", greedy)
    engine.add_request("b", "and the second one", greedy)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return done, engine.stats().num_swapped_out_blocks

small, swapped = run(sys.argv[1], device_blocks=5)
ample, _ = run(sys.argv[1], device_blocks=64)
print(json.dumps({"small": small, "ample": ample, "swapped": swapped}))
"""


def _run(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", NO_TRITON + code, *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_engine_imports_without_triton():
    _run("import engine, engine.llm_engine\n"
         "from engine import LLM, EngineConfig\n"
         "EngineConfig(attention_backend='torch')\n")


def test_torch_backend_serves_and_swaps_without_triton(tiny_llama_dir):
    out = json.loads(_run(SERVE, str(tiny_llama_dir)).splitlines()[-1])
    assert out["swapped"] > 0
    assert out["small"] == out["ample"]
    assert all(len(tokens) == 40 for tokens in out["ample"].values())
