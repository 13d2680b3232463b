"""Tensor parallelism on the CPU: two ranks over gloo give the tokens one rank gives.

Float32 throughout: the ranks' partial sums differ from one rank's in the last bits
only, far below the random checkpoints' logit margins. The second rank is a real
spawned process; every test also checks that none outlives its engine.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.distributed.ranks import RankFailure
from tests.engine.families import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 60))]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(n=2, max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)


def _tokens(path: Path | str, tp: int, prompts: list, params: list[SamplingParams],
            **kwargs) -> tuple[list[list[list[int]]], int]:
    """Every completion's tokens, and the blocks swapped out on the way."""
    with LLM(str(path), tensor_parallel_size=tp, dtype="float32", device="cpu",
             **kwargs) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        swapped = llm.engine.stats().num_swapped_out_blocks
        pids = llm.engine.ranks.pids if tp > 1 else []
    _assert_gone(pids)
    return [[c.token_ids for c in o.outputs] for o in outs], swapped


def _assert_gone(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    for pid in pids:
        while _alive(pid):
            assert time.monotonic() < deadline, f"rank process {pid} outlived its engine"
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not reaped yet is a zombie: as good as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("shape", [
    dict(arch="llama", num_heads=4, num_kv_heads=2),   # GQA, 2 KV heads: one per rank
    pytest.param(dict(arch="qwen2", num_heads=4, num_kv_heads=2),  # q/k/v bias cut too
                 marks=pytest.mark.slow),
    pytest.param(dict(arch="llama", num_heads=4, num_kv_heads=1),  # one KV head, both ranks
                 marks=pytest.mark.slow),
], ids=["llama-gqa", "qwen2", "llama-mqa"])
def test_two_ranks_match_one(make_checkpoint, shape):
    # vocab 509: not a multiple of 2, so the last rank's vocabulary rows are padded.
    path = make_checkpoint(**shape, vocab=509)
    params = [GREEDY, SAMPLED, GREEDY]
    one, _ = _tokens(path, 1, PROMPTS, params, num_device_blocks=64)
    two, _ = _tokens(path, 2, PROMPTS, params, num_device_blocks=64)
    assert two == one


@pytest.mark.slow
def test_smollm2_uneven_heads(smollm2_dir):
    """SmolLM2's 9 query heads over 3 KV heads split 6 + 3 across two ranks."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    one, _ = _tokens(smollm2_dir, 1, prompts, [GREEDY] * 3, num_device_blocks=64)
    two, _ = _tokens(smollm2_dir, 2, prompts, [GREEDY] * 3, num_device_blocks=64)
    assert two == one


@pytest.mark.slow
def test_swap_preemption_across_ranks(make_checkpoint):
    """A pool far too small swaps sequences out and back on both ranks; the tokens are
    those of a pool that never preempts, n > 1 forks and all."""
    path = make_checkpoint(num_heads=4, num_kv_heads=2, vocab=509)
    prompts = [list(range(3 + i, 40 + i)) for i in range(6)]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(n=2, max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)] * 3
    calm, calm_swaps = _tokens(path, 1, prompts, params, num_device_blocks=512, block_size=8)
    pressed, swaps = _tokens(path, 2, prompts, params, num_device_blocks=12, block_size=8,
                             max_model_len=96)
    assert calm_swaps == 0 and swaps > 0
    assert pressed == calm


def test_failing_rank_stops_the_engine(make_checkpoint):
    """Rank 1 raises on a step it cannot run: the engine's next step says which rank
    failed and why, and no rank process is left."""
    path = make_checkpoint(num_heads=4, num_kv_heads=2, vocab=509)
    llm = LLM(str(path), tensor_parallel_size=2, dtype="float32", device="cpu",
              num_device_blocks=64)
    pids = llm.engine.ranks.pids
    llm.engine.ranks.send_step(None)  # rank 1 fails on it, alone
    with pytest.raises(RankFailure, match="rank 1: AttributeError"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    _assert_gone(pids)
    llm.close()


@pytest.mark.slow
def test_unsplittable_heads_are_refused(make_checkpoint):
    path = make_checkpoint(num_heads=4, num_kv_heads=1, vocab=509)
    with pytest.raises(ValueError, match="cannot split 4 attention heads over 1 KV heads"):
        LLM(str(path), tensor_parallel_size=3, dtype="float32", device="cpu",
            num_device_blocks=64)


@pytest.mark.slow
def test_killed_engine_process_leaves_no_rank(make_checkpoint, tmp_path):
    """kill -9 of the engine's process: its rank notices within a second and exits."""
    path = make_checkpoint(num_heads=4, num_kv_heads=2, vocab=509)
    script = tmp_path / "tp_engine.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from engine import LLM

        if __name__ == "__main__":
            llm = LLM({str(path)!r}, tensor_parallel_size=2, dtype="float32",
                      device="cpu", num_device_blocks=64)
            print(*llm.engine.ranks.pids, flush=True)
            time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_gone(pids)
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["phi3", "mixtral", "gemma2"])
def test_families_split(family, tmp_path):
    """Phi-3's checkpoint fuses q/k/v and gate/up itself; Mixtral's experts split their
    intermediate size; Gemma 2 scales the embedding and soft-caps the logits."""
    path = build(family, tmp_path / family)
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 50))]
    one, _ = _tokens(path, 1, prompts, [GREEDY] * 2, num_device_blocks=64)
    two, _ = _tokens(path, 2, prompts, [GREEDY] * 2, num_device_blocks=64)
    assert two == one
