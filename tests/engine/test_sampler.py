"""The sampler on fixed logits: each knob changes the distribution as specified."""

import math

import pytest
import torch

from engine.sampler import Sampler, apply_penalties, argmax_rows, truncate
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def _kept(row: torch.Tensor) -> list[int]:
    return torch.isfinite(row).nonzero().flatten().tolist()


def test_top_k_top_p_min_p_truncate_as_specified():
    assert _kept(truncate(LOGITS, SamplingParams(top_k=2))) == [0, 1]
    # Nucleus: 0.5 alone is under 0.7, 0.5 + 0.3 reaches it.
    assert _kept(truncate(LOGITS, SamplingParams(top_p=0.7))) == [0, 1]
    assert _kept(truncate(LOGITS, SamplingParams(top_p=0.81))) == [0, 1, 2]
    # min_p 0.2 of the top probability 0.5 drops everything under 0.1.
    assert _kept(truncate(LOGITS, SamplingParams(min_p=0.2))) == [0, 1, 2]
    assert _kept(truncate(LOGITS, SamplingParams())) == [0, 1, 2, 3]


def _frequencies(params: SamplingParams, draws: int = 4000) -> torch.Tensor:
    sampler = Sampler(eos_token_ids=set())
    gen = torch.Generator().manual_seed(0)
    seqs = [Sequence(i, [0], prompt_len=1, generator=gen) for i in range(draws)]
    results = sampler(LOGITS.expand(draws, -1), seqs, [params] * draws)
    counts = torch.bincount(torch.tensor([r.token_id for r in results]), minlength=4)
    return counts / draws


def test_sampling_follows_the_truncated_renormalised_distribution():
    assert torch.allclose(_frequencies(SamplingParams()), PROBS, atol=0.03)
    assert torch.allclose(_frequencies(SamplingParams(top_p=0.7)),
                          torch.tensor([0.625, 0.375, 0, 0]), atol=0.03)
    # Temperature 2 flattens: p ~ sqrt(p) renormalised.
    flat = PROBS.sqrt() / PROBS.sqrt().sum()
    assert torch.allclose(_frequencies(SamplingParams(temperature=2.0)), flat, atol=0.03)


def test_logprobs_are_taken_after_temperature():
    sampler = Sampler(eos_token_ids=set())
    seq = Sequence(0, [0], prompt_len=1)
    res = sampler(LOGITS[None], [seq], [SamplingParams(temperature=0, logprobs=2)])[0]
    assert res.token_id == 0 and math.isclose(res.logprob, math.log(0.5), rel_tol=1e-5)
    assert set(res.top_logprobs) == {0, 1}


def test_penalties_follow_transformers_and_openai_rules():
    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seq = Sequence(0, [0, 1, 2, 2], prompt_len=2)  # prompt [0, 1], output [2, 2]
    apply_penalties(row, seq, SamplingParams(repetition_penalty=2.0))
    assert row.tolist() == [1.0, -4.0, 0.5, 0.5]
    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    apply_penalties(row, seq, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert row.tolist() == [2.0, -2.0, 1.0 - 0.5 - 2 * 0.25, 0.5]


def test_min_tokens_bans_eos_until_reached():
    sampler = Sampler(eos_token_ids={0})
    seq = Sequence(0, [3], prompt_len=1)
    res = sampler(LOGITS[None], [seq], [SamplingParams(temperature=0, min_tokens=1)])[0]
    assert res.token_id == 1
    seq.token_ids.append(1)
    res = sampler(LOGITS[None], [seq], [SamplingParams(temperature=0, min_tokens=1)])[0]
    assert res.token_id == 0


def _seqs(n: int, seed: int = 0) -> list[Sequence]:
    return [Sequence(i, [3, 1], prompt_len=1, generator=torch.Generator().manual_seed(seed + i))
            for i in range(n)]


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, top_p=0.9, logprobs=1),
    SamplingParams(temperature=0, logprobs=2),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0, repetition_penalty=3.0),
    SamplingParams(temperature=1.5, top_k=3, presence_penalty=0.5, logprobs=0),
    SamplingParams(temperature=0, min_tokens=2),
]


def test_logprobs_only_for_requests_that_ask():
    logits = torch.randn(len(MIXED), 50, generator=torch.Generator().manual_seed(1))
    seqs = _seqs(len(MIXED))
    results = Sampler(eos_token_ids={0})(logits, seqs, MIXED)
    for row, (res, seq, p) in enumerate(zip(results, seqs, MIXED, strict=True)):
        if p.logprobs is None:
            assert res.logprob is None and res.top_logprobs is None
            continue
        # After penalties and temperature, before truncation.
        edited = logits[row].clone()
        apply_penalties(edited, seq, p)
        want = torch.log_softmax(edited / (p.temperature or 1.0), -1)
        assert math.isclose(res.logprob, want[res.token_id].item(), abs_tol=1e-5)
        if p.logprobs == 0:
            assert res.top_logprobs is None
        else:
            top = want.topk(p.logprobs)
            assert set(res.top_logprobs) == set(top.indices.tolist()) | {res.token_id}


def test_each_row_samples_as_it_would_alone():
    """Greedy rows, random rows (own generator) and edited rows are independent of the batch."""
    logits = torch.randn(len(MIXED), 50, generator=torch.Generator().manual_seed(2))
    sampler = Sampler(eos_token_ids={0})
    together = sampler(logits, _seqs(len(MIXED)), MIXED)
    alone = [sampler(logits[row:row + 1], [seq], [p])[0]
             for row, (seq, p) in enumerate(zip(_seqs(len(MIXED)), MIXED, strict=True))]
    assert together == alone
    greedy = [r.token_id for r, p in zip(together, MIXED, strict=True) if p.greedy]
    assert greedy[:2] == [logits[0].argmax().item(), logits[2].argmax().item()]


def test_greedy_bfloat16_rows_take_the_float32_argmax_and_logits_stay():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(3)).bfloat16()
    before = logits.clone()
    params = [SamplingParams(temperature=0)] * 64
    results = Sampler(eos_token_ids=set())(logits, _seqs(64), params)
    assert [r.token_id for r in results] == logits.float().argmax(-1).tolist()
    assert all(r.logprob is None and r.top_logprobs is None for r in results)
    mixed = logits[:len(MIXED)].float()
    Sampler(eos_token_ids={0})(mixed, _seqs(len(MIXED)), MIXED)
    assert torch.equal(logits, before) and torch.equal(mixed, before[:len(MIXED)].float())


def test_a_failing_call_leaves_generators_untouched():
    seqs = _seqs(3)
    states = [s.generator.get_state() for s in seqs]
    params = [SamplingParams(), SamplingParams(temperature=0),
              SamplingParams(logprobs=10)]  # more than the 4 tokens: topk raises
    with pytest.raises(RuntimeError):
        Sampler(eos_token_ids=set())(LOGITS.expand(3, -1), seqs, params)
    assert all(torch.equal(s.generator.get_state(), st) for s, st in zip(seqs, states, strict=True))


@pytest.mark.parametrize("vocab", [512, 32000, 32064, 1000, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_equals_torch_argmax_first_maximum_on_ties(vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(7, vocab, generator=gen).to(dtype)
    x[1, :] = 0.0  # all tied: the first index
    x[2, vocab // 3] = x[2, vocab - 1] = 100.0  # two maxima in different blocks
    x[3, -1] = 100.0  # the last element
    x[4, 5] = float("-inf")
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert argmax_rows(x)[1] == 0 and argmax_rows(x)[2] == vocab // 3


def test_each_row_keeps_its_own_result_when_random_rows_come_after_greedy_ones():
    logits = torch.full((2, 8), -10.0)
    logits[0, 3] = logits[1, 6] = 10.0
    seqs = [Sequence(0, [5, 6], 2), Sequence(1, [5, 6], 2, torch.Generator().manual_seed(0))]
    results = Sampler({2})(logits, seqs, [SamplingParams(temperature=0, logprobs=1),
                                          SamplingParams(temperature=1.0, seed=0)])
    assert [r.token_id for r in results] == [3, 6]
    assert results[0].logprob == pytest.approx(0.0, abs=1e-6) and results[1].logprob is None
