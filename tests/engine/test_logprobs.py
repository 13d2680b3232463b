"""Log-probabilities the engine returns match Transformers' in float32."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, Logprob, SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    path = make_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", device="cpu", num_device_blocks=64,
              swap_space_gib=0.01)
    return model, llm


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 7, 20)]


def _assert_step(step: dict[int, Logprob], token: int, want: torch.Tensor, k: int) -> None:
    """One step's returned logprobs and ranks against the reference log-softmax `want`."""
    assert math.isclose(step[token].logprob, want[token].item(), abs_tol=TOL)
    top = want.topk(k)
    assert set(step) == set(top.indices.tolist()) | {token}
    for t, lp in step.items():
        assert math.isclose(lp.logprob, want[t].item(), abs_tol=TOL)
        assert lp.rank == int((want > want[t]).sum()) + 1


def test_greedy_logprobs_match_transformers(checkpoint):
    model, llm = checkpoint
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        x = torch.tensor([prompt])
        with torch.inference_mode():
            ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=8, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        got = out.outputs[0]
        assert got.token_ids == ref.sequences[0, len(prompt):].tolist()
        assert len(got.logprobs) == 8
        for token, step, logits in zip(got.token_ids, got.logprobs, ref.logits, strict=True):
            _assert_step(step, token, torch.log_softmax(logits[0].float(), -1), 3)
        total = sum(step[t].logprob for t, step in zip(got.token_ids, got.logprobs,
                                                        strict=True))
        assert math.isclose(got.cumulative_logprob, total, abs_tol=TOL)


def test_sampled_logprobs_are_after_temperature(checkpoint):
    model, llm = checkpoint
    prompt = _prompts()[1]
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=8, logprobs=2, ignore_eos=True)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + got.token_ids])).logits[0].float()
    # Row i predicts the token at position i + 1: the outputs follow the prompt's last row.
    rows = logits[len(prompt) - 1:-1]
    for token, step, row in zip(got.token_ids, got.logprobs, rows, strict=True):
        _assert_step(step, token, torch.log_softmax(row / 0.7, -1), 2)


def test_no_logprobs_unless_asked(checkpoint):
    _, llm = checkpoint
    asked = SamplingParams(temperature=0, max_tokens=4, logprobs=0, ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, seed=1, max_tokens=4, ignore_eos=True)
    prompt = _prompts()[2]
    with_lp, without, random_row = (out.outputs[0] for out in llm.generate(
        [prompt] * 3, [asked, plain, sampled], use_tqdm=False))
    assert without.token_ids == with_lp.token_ids
    # logprobs=0: only the chosen token's logprob at each step.
    assert [list(step) for step in with_lp.logprobs] == [[t] for t in with_lp.token_ids]
    assert math.isclose(with_lp.cumulative_logprob,
                        sum(v.logprob for step in with_lp.logprobs for v in step.values()),
                        abs_tol=TOL)
    for out in (without, random_row):
        assert out.logprobs is None and out.cumulative_logprob is None


@pytest.mark.parametrize("chunk", [None, 5])
def test_prompt_logprobs_match_transformers(checkpoint, chunk):
    model, llm = checkpoint
    prompt = _prompts()[2]  # 20 tokens
    if chunk is not None:  # prefill in chunks of 5 tokens, mixed with the other request
        llm = LLM(str(llm.model_path), dtype="float32", device="cpu", num_device_blocks=64,
                  max_num_batched_tokens=chunk + 1, max_num_seqs=2, swap_space_gib=0.01)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    # The same prompt twice: the second would hit the prefix cache, which has no logits.
    first, again = llm.generate([prompt, prompt], params, use_tqdm=False)
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    for out in (first, again):
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for i, step in enumerate(got[1:], 1):
            _assert_step(step, prompt[i], want[i - 1], 2)
    plain = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
