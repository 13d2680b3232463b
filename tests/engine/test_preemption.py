"""Preemption end to end: swap to the CPU pool and back, recompute, and the mix of both.

Small random checkpoints on CPU. A device pool far smaller than the workload makes
most steps preempt; the outputs must still equal those of a pool that never
preempts, every block must come back, and no request may be stuck or lost.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine import BeamSearchParams, EngineConfig, LLMEngine, RequestOutput, SamplingParams
from engine.cache_engine import CacheEngine
from engine.torch_attention import TorchBackend

# The random checkpoint's shape; the KV part sizes the CPU pool.
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 512
FIRST_TOKEN = 3  # prompts avoid the special ids 0-2 (EOS is 2)
BLOCK_SIZE = 16
SMALL_POOL = 24  # device blocks of 16 for 16 requests: 20-30 preemptions a run
LARGE_POOL = 512  # never preempts
AMPLE_SWAP = 512
TIGHT_SWAP = 6  # too small for everything: some preemptions must recompute
MAX_MODEL_LEN = 128  # the engine wants one sequence of max_model_len to fit the pool

Params = SamplingParams | BeamSearchParams


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with fixed weights (seed 0). make_checkpoint seeds by build
    order, and the regression cases below need the same beams whatever ran first."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB,
        max_position_embeddings=1024, initializer_range=0.25, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("preemption-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _engine(path: Path, device_blocks: int, swap_blocks: int, mode: str = "swap",
            block_size: int = BLOCK_SIZE, **overrides) -> LLMEngine:
    """An engine with exactly `device_blocks` device and `swap_blocks` CPU blocks."""
    block_bytes = CacheEngine.block_bytes(LAYERS, KV_HEADS, HEAD_DIM, block_size, torch.float32)
    engine = LLMEngine(EngineConfig(
        model=str(path), dtype="float32", device="cpu", block_size=block_size,
        num_device_blocks=device_blocks, swap_space_gib=swap_blocks * block_bytes / 2**30,
        preemption_mode=mode, max_model_len=MAX_MODEL_LEN, **overrides))
    assert engine.stats().swap_blocks_total == swap_blocks
    return engine


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt: list[int]
    params: Params


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN, VOCAB) for _ in range(length)]


def _params(kind: str, max_tokens: int, seed: int) -> Params:
    if kind == "beam":
        return BeamSearchParams(beam_width=3, max_tokens=max_tokens, ignore_eos=True)
    if kind == "greedy":
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    n = 4 if kind == "n4" else 1
    return SamplingParams(n=n, temperature=0.8, top_p=0.95, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True)


# Per kind: prompt and output length ranges (forked kinds hold more blocks per request).
LENGTHS = {"greedy": (4, 24, 40, 96), "seeded": (4, 24, 40, 96), "n4": (4, 24, 16, 48),
           "beam": (4, 24, 16, 48)}


def _workload(kind: str, num: int = 16) -> list[Request]:
    min_prompt, max_prompt, min_out, max_out = LENGTHS[kind]
    rng = random.Random(kind)
    return [Request(f"{kind}-{i}", _prompt(rng, rng.randint(min_prompt, max_prompt)),
                    _params(kind, rng.randint(min_out, max_out), seed=1000 + i))
            for i in range(num)]


def _run(engine: LLMEngine, requests: list[Request],
         max_steps: int = 2000) -> dict[str, RequestOutput]:
    """Add every request, then step until all finish; fails if `max_steps` is not enough."""
    for r in requests:
        engine.add_request(r.request_id, r.prompt, r.params)
    outputs: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    raise AssertionError(f"still unfinished after {max_steps} steps: {sorted(engine.requests)}")


def _tokens(out: RequestOutput) -> list[tuple[list[int], str | None]]:
    return [(c.token_ids, c.finish_reason) for c in out.outputs]


def _assert_all_blocks_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.device_blocks_free == stats.device_blocks_total
    assert stats.swap_blocks_free == stats.swap_blocks_total
    bm = engine.block_manager
    assert set(bm.device.ref_counts) == {0} and set(bm.cpu.ref_counts) <= {0}
    assert (stats.num_running, stats.num_waiting, stats.num_swapped) == (0, 0, 0)


# ---- outputs under heavy preemption equal a pool that never preempts -------------------


@pytest.fixture(scope="module")
def reference(model_dir):
    """Outputs of each workload kind with a pool that never preempts (computed once)."""
    cache: dict[str, dict[str, RequestOutput]] = {}

    def get(kind: str) -> dict[str, RequestOutput]:
        if kind not in cache:
            engine = _engine(model_dir, LARGE_POOL, 0)
            cache[kind] = _run(engine, _workload(kind))
            assert engine.stats().num_preemptions == 0
        return cache[kind]

    return get


MODES = {  # name: (preemption_mode, CPU blocks)
    "swap": ("swap", AMPLE_SWAP),
    "recompute": ("recompute", AMPLE_SWAP),
    "mixed": ("swap", TIGHT_SWAP),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", ["greedy", "seeded", "n4", "beam"])
def test_outputs_survive_preemption_unchanged(model_dir, reference, kind, mode):
    preemption_mode, swap_blocks = MODES[mode]
    engine = _engine(model_dir, SMALL_POOL, swap_blocks, preemption_mode)
    outputs = _run(engine, _workload(kind))
    expected = reference(kind)
    assert outputs.keys() == expected.keys()
    for request_id, out in outputs.items():
        assert _tokens(out) == _tokens(expected[request_id]), request_id
    stats = engine.stats()
    metrics = [o.metrics for o in outputs.values()]
    recomputed = sum(m.num_recomputed_tokens for m in metrics)
    assert stats.num_preemptions >= len(outputs)
    assert sum(m.num_preemptions for m in metrics) == stats.num_preemptions
    assert sum(m.num_swapped_out_blocks for m in metrics) == stats.num_swapped_out_blocks
    # Nothing was aborted, so every block that went out came back in.
    assert stats.num_swapped_in_blocks == stats.num_swapped_out_blocks
    assert (stats.num_swapped_out_blocks > 0) == (mode != "recompute")
    assert (recomputed > 0) == (mode != "swap")
    _assert_all_blocks_free(engine)


# ---- the cache engine moves blocks bit for bit -----------------------------------------


@pytest.mark.parametrize(("dtype", "bits"), [(torch.float32, torch.int32),
                                             (torch.bfloat16, torch.int16)])
def test_swap_round_trip_is_bit_exact(dtype, bits):
    cache = CacheEngine(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4,
                        num_device_blocks=10, num_cpu_blocks=6, dtype=dtype,
                        device=torch.device("cpu"), backend=TorchBackend(block_size=4))
    info = torch.iinfo(bits)
    generator = torch.Generator().manual_seed(0)
    # Random bit patterns: every exponent, subnormals, infinities and NaN payloads.
    cache.device_cache.view(bits).copy_(torch.randint(
        info.min, info.max, cache.device_cache.shape, dtype=bits, generator=generator))
    cache.cpu_cache.zero_()
    original = cache.device_cache.view(bits).clone()
    swap_out = {7: 0, 2: 5, 4: 3, 9: 1}  # device -> cpu
    cache.swap_out(swap_out)
    for dev, cpu in swap_out.items():
        assert torch.equal(cache.cpu_cache[:, :, cpu].view(bits), original[:, :, dev])
    cache.device_cache.zero_()  # the device blocks get reused meanwhile
    swap_in = {0: 8, 5: 0, 3: 6, 1: 2}  # cpu -> device
    cache.swap_in(swap_in)
    restored = cache.device_cache.view(bits)
    for dev, cpu in swap_out.items():
        assert torch.equal(restored[:, :, swap_in[cpu]], original[:, :, dev])
    untouched = sorted(set(range(10)) - set(swap_in.values()))
    assert not restored[:, :, untouched].any()


# ---- aborts --------------------------------------------------------------------------


def test_aborting_a_swapped_request_frees_its_cpu_blocks(model_dir):
    engine = _engine(model_dir, device_blocks=12, swap_blocks=64)
    rng = random.Random(3)
    for i in range(4):
        engine.add_request(f"r{i}", _prompt(rng, 20), SamplingParams(
            n=4, temperature=0.8, seed=i, max_tokens=10, ignore_eos=True))
    for _ in range(100):
        engine.step()
        if engine.scheduler.swapped:
            break
    victim = engine.scheduler.swapped[0]
    tables = [s.block_table for s in victim.live_seqs()]
    distinct = len({b for table in tables for b in table})
    assert distinct < sum(map(len, tables))  # its prompt block is shared by the samples
    free_before = engine.stats().swap_blocks_free
    engine.abort_request(victim.request_id)
    assert engine.stats().swap_blocks_free == free_before + distinct
    outs = _run(engine, [])
    aborted = outs[victim.request_id]
    assert aborted.abort_reason == "aborted by the caller"
    assert {c.finish_reason for c in aborted.outputs} == {"abort"}
    others = [o for o in outs.values() if o is not aborted]
    assert len(others) == 3
    assert {c.finish_reason for o in others for c in o.outputs} == {"length"}
    _assert_all_blocks_free(engine)


def test_request_larger_than_the_pool_aborts_and_the_others_finish(model_dir):
    """Four samples that each grow to max_model_len (8 blocks) cannot share an 8-block pool."""
    rng = random.Random(4)
    requests = [Request("wide", _prompt(rng, 40), _params("n4", 200, 7))]
    requests += [Request(f"small{i}", _prompt(rng, rng.randint(4, 30)), _params("greedy", 20, 0))
                 for i in range(6)]
    expected = _run(_engine(model_dir, LARGE_POOL, 0), requests)
    for mode in ("swap", "recompute"):
        engine = _engine(model_dir, 8, AMPLE_SWAP, mode)
        outs = _run(engine, requests)
        wide = outs["wide"]
        assert {c.finish_reason for c in wide.outputs} == {"abort"}
        assert "device pool holds 8" in wide.abort_reason
        # What the samples produced before the limit is what they would have produced.
        for got, want in zip(wide.outputs, expected["wide"].outputs, strict=True):
            assert got.token_ids and got.token_ids == want.token_ids[:len(got.token_ids)]
        for i in range(6):
            assert _tokens(outs[f"small{i}"]) == _tokens(expected[f"small{i}"])
        _assert_all_blocks_free(engine)


# ---- requests that fit are never lost to preemption ------------------------------------


def test_swapped_request_that_needs_the_whole_pool_resumes(model_dir):
    """Swapped out holding 7 full blocks of an 8-block pool, it needs exactly 8 to go on."""
    engine = _engine(model_dir, device_blocks=8, swap_blocks=64)
    requests = [Request("first", [5], _params("greedy", 10, 0)),
                Request("big", _prompt(random.Random(5), 112), _params("greedy", 5, 0))]
    outs = _run(engine, requests, max_steps=100)
    assert engine.stats().num_swapped_out_blocks == 7
    assert {c.finish_reason for o in outs.values() for c in o.outputs} == {"length"}
    _assert_all_blocks_free(engine)


def test_swapped_samples_resume_when_their_next_step_fits(model_dir):
    """Four samples swapped out at a block boundary hold 5 blocks (one shared) and need
    9 to go on; an empty 12-block pool has room, so they must resume."""
    engine = _engine(model_dir, device_blocks=12, swap_blocks=64)
    rng = random.Random(3)
    requests = [Request(f"r{i}", _prompt(rng, 20), _params("n4", 24, i)) for i in range(4)]
    outs = _run(engine, requests, max_steps=300)
    assert engine.stats().num_swapped_out_blocks > 0
    assert {c.finish_reason for o in outs.values() for c in o.outputs} == {"length"}
    _assert_all_blocks_free(engine)


@pytest.mark.parametrize("caching", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_samples_that_fit_shared_are_not_aborted(model_dir, mode, caching):
    """n = 4 samples share a 3-block prompt: 7 blocks in all, 16 unshared. Preempted
    for an earlier request in a 9-block pool, they must finish, not abort, with the
    tokens of a pool that never preempts. Without prefix caching nothing can rebuild
    the sharing from cache hits: a recompute must re-prefill the prompt once."""
    rng = random.Random(6)
    requests = [Request("first", _prompt(rng, 40), _params("greedy", 20, 0)),
                Request("samples", _prompt(rng, 50), _params("n4", 8, 1))]
    expected = _run(_engine(model_dir, LARGE_POOL, 0), requests)
    engine = _engine(model_dir, device_blocks=9, swap_blocks=AMPLE_SWAP, mode=mode,
                     enable_prefix_caching=caching)
    outs = _run(engine, requests, max_steps=200)
    assert outs["samples"].metrics.num_preemptions >= 1
    assert outs["samples"].abort_reason is None
    for request_id, out in outs.items():
        assert _tokens(out) == _tokens(expected[request_id]), request_id
    _assert_all_blocks_free(engine)


def test_requests_sharing_a_cached_prefix_swap_out_in_one_step(model_dir):
    """b and c hold the same prefix-cached blocks; a more important request's prefill
    chunk swaps both out in one step. Each needs its own CPU copy of the shared blocks."""
    rng = random.Random(7)
    prefix = _prompt(rng, 32)
    greedy = _params("greedy", 12, 0)
    shared = [Request("b", prefix + _prompt(rng, 4), greedy),
              Request("c", prefix + _prompt(rng, 4), greedy)]
    urgent = Request("a", _prompt(rng, 90), _params("greedy", 4, 0))
    expected = _run(_engine(model_dir, LARGE_POOL, 0), [*shared, urgent])
    engine = _engine(model_dir, 8, AMPLE_SWAP, max_num_batched_tokens=48)
    for r in shared:
        engine.add_request(r.request_id, r.prompt, r.params, priority=1)
    engine.step()
    engine.step()
    engine.add_request(urgent.request_id, urgent.prompt, urgent.params, priority=0)
    engine.step()  # a's first chunk
    assert engine.stats().num_preemptions == 0
    outs = {o.request_id: o for o in engine.step()}  # a's second chunk needs b's and c's room
    assert engine.stats().num_swapped == 2
    outs.update(_run(engine, []))
    for request_id, out in outs.items():
        assert _tokens(out) == _tokens(expected[request_id]), request_id
    _assert_all_blocks_free(engine)


def test_beams_keep_their_own_logits_after_recompute(model_dir):
    """After a recompute, prefix caching can give one beam all its blocks back (a one-token
    step) and the other fewer (a longer step): each beam must still get its own logits."""
    beam = [BeamSearchParams(beam_width=2, max_tokens=n, ignore_eos=True) for n in (28, 15)]
    for seed in range(8):
        rng = random.Random(seed)
        requests = [Request("first", _prompt(rng, 13), beam[0]),
                    Request("second", _prompt(rng, 39), beam[1])]
        expected = _run(_engine(model_dir, LARGE_POOL, 0), requests)
        engine = _engine(model_dir, 8, 0, "recompute")
        outs = _run(engine, requests)
        assert engine.stats().num_preemptions > 0
        for request_id, out in outs.items():
            assert _tokens(out) == _tokens(expected[request_id]), (seed, request_id)


# ---- soak ------------------------------------------------------------------------------


@dataclass
class Soak:
    """Bookkeeping of the soak: what was added, aborted and finished."""

    requests: dict[str, Request] = field(default_factory=dict)
    max_tokens: dict[str, int] = field(default_factory=dict)
    too_big: set[str] = field(default_factory=set)
    doomed: dict[str, int] = field(default_factory=dict)  # request id -> abort deadline
    aborted: set[str] = field(default_factory=set)
    aborted_swapped: int = 0
    finished: dict[str, RequestOutput] = field(default_factory=dict)


SOAK_KINDS = ["greedy", "greedy", "seeded", "seeded", "n2", "n3", "beam"]
SOAK_REQUESTS = 500
SOAK_MAX_STEPS = 5000  # about twice what the soak takes
SOAK_SYSTEM_PROMPT = _prompt(random.Random(0), 20)


def _soak_request(rng: random.Random, i: int, soak: Soak) -> Request:
    kind = rng.choice(SOAK_KINDS)
    max_tokens = rng.randint(1, 40)
    if rng.random() < 0.01:  # 4 samples of max_model_len: more than the whole pool
        soak.too_big.add(f"s{i}")
        return Request(f"s{i}", _prompt(rng, 60), _params("n4", 200, i))
    if kind == "beam":
        params: Params = BeamSearchParams(beam_width=2, max_tokens=max_tokens, ignore_eos=True)
    elif kind in ("n2", "n3"):
        params = SamplingParams(n=int(kind[1]), temperature=1.0, seed=i, max_tokens=max_tokens)
    else:
        params = _params(kind, max_tokens, i)
    soak.max_tokens[f"s{i}"] = max_tokens
    # A third share a system prompt: prefix-cached blocks shared across requests get moved too.
    shared = SOAK_SYSTEM_PROMPT if rng.random() < 1 / 3 else []
    return Request(f"s{i}", shared + _prompt(rng, rng.randint(1, 40)), params)


def _soak_arrivals(rng: random.Random) -> int:
    """About as many arrivals as the small pool serves (0.25 a step), in bursts at times."""
    return 6 if rng.random() < 0.01 else int(rng.random() < 0.2)


def _soak_add(engine: LLMEngine, rng: random.Random, r: Request, step: int,
              soak: Soak) -> None:
    """Add a request; one in six is doomed to be aborted within the next 100 steps."""
    engine.add_request(r.request_id, r.prompt, r.params, priority=rng.randint(0, 2))
    soak.requests[r.request_id] = r
    if rng.random() < 1 / 6:
        soak.doomed[r.request_id] = step + rng.randint(0, 100)


def _soak_aborts(engine: LLMEngine, rng: random.Random, step: int, soak: Soak) -> None:
    """Doomed requests go at their deadline, or earlier when seen swapped out (half the time)."""
    swapped = {g.request_id for g in engine.scheduler.swapped}
    for request_id, deadline in list(soak.doomed.items()):
        if request_id not in engine.requests:
            del soak.doomed[request_id]  # finished first
        elif step >= deadline or (request_id in swapped and rng.random() < 0.5):
            del soak.doomed[request_id]
            soak.aborted_swapped += request_id in swapped
            soak.aborted.add(request_id)
            engine.abort_request(request_id)


def _soak_step(engine: LLMEngine, soak: Soak) -> None:
    for out in engine.step():
        assert out.request_id not in soak.finished, f"{out.request_id} reported after finishing"
        if out.finished:
            soak.finished[out.request_id] = out
    stats = engine.stats()
    assert 0 <= stats.device_blocks_free <= stats.device_blocks_total
    assert 0 <= stats.swap_blocks_free <= stats.swap_blocks_total


def _check_soak_output(request_id: str, out: RequestOutput, soak: Soak) -> None:
    reasons = {c.finish_reason for c in out.outputs}
    if request_id in soak.aborted:
        assert reasons <= {"abort", "stop", "length"}
    elif request_id in soak.too_big:
        assert reasons == {"abort"} and "device pool holds" in out.abort_reason
    else:
        assert reasons <= {"stop", "length"}, (request_id, out.abort_reason)
        assert all(len(c.token_ids) <= soak.max_tokens[request_id] for c in out.outputs)


def _soak(path: Path, seed: int, mode: str, swap_blocks: int) -> None:
    """Requests of random kinds, lengths and priorities arrive while others run; those not
    doomed to an abort must finish on their own, within the step bound, with the outputs
    of a pool that never preempts."""
    rng = random.Random(seed)
    engine = _engine(path, device_blocks=32, swap_blocks=swap_blocks, mode=mode, block_size=8)
    soak = Soak()
    pending = [_soak_request(rng, i, soak) for i in reversed(range(SOAK_REQUESTS))]
    for step in range(SOAK_MAX_STEPS):
        for _ in range(min(_soak_arrivals(rng), len(pending))):
            _soak_add(engine, rng, pending.pop(), step, soak)
        _soak_aborts(engine, rng, step, soak)
        _soak_step(engine, soak)
        if not pending and not engine.has_unfinished_requests():
            break
    assert not pending and not engine.requests, (
        f"stuck after {SOAK_MAX_STEPS} steps: {sorted(engine.requests)}")
    assert len(soak.finished) == SOAK_REQUESTS
    for request_id, out in soak.finished.items():
        _check_soak_output(request_id, out, soak)
    _assert_all_blocks_free(engine)
    stats = engine.stats()
    recomputed = sum(o.metrics.num_recomputed_tokens for o in soak.finished.values())
    assert stats.num_preemptions > 0
    assert (recomputed > 0) == (swap_blocks < AMPLE_SWAP)
    assert (stats.num_swapped_out_blocks > 0) == (soak.aborted_swapped > 0) == (swap_blocks > 0)
    done = [soak.requests[i] for i in soak.finished if i not in soak.aborted | soak.too_big]
    expected = _run(_engine(path, LARGE_POOL, 0, block_size=8), done)
    for r in done:
        assert _tokens(soak.finished[r.request_id]) == _tokens(expected[r.request_id]), (
            r.request_id)


@pytest.mark.slow
def test_soak_500_requests_with_aborts_and_a_small_pool(model_dir):
    _soak(model_dir, seed=2024, mode="swap", swap_blocks=24)  # swap and recompute mixed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("mode", "swap_blocks"),
                         [("swap", 24), ("swap", AMPLE_SWAP), ("recompute", 0)])
def test_soak_more_seeds_and_modes(model_dir, seed, mode, swap_blocks):
    _soak(model_dir, seed, mode, swap_blocks)
