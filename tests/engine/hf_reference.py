"""Transformers as the reference: greedy generate on one prompt at a time (no padding)."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int,
              ignore_eos: bool = False) -> list[list[int]]:
    """Greedy continuations; with `ignore_eos` each has exactly `max_new_tokens` tokens
    (EOS is still chosen when it is the argmax, like `SamplingParams(ignore_eos=True)`)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stop = {"eos_token_id": None} if ignore_eos else {}
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=0, **stop)
            outs.append(y[0, len(ids):].tolist())
    if ignore_eos:
        assert all(len(o) == max_new_tokens for o in outs), "generate stopped early"
    return outs
