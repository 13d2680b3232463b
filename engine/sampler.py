"""Turn next-token logits into tokens, one row per sequence.

Order of processing, as in vLLM: penalties, min_tokens, temperature, then
top-k / top-p / min-p truncation. Logprobs are taken after temperature and
penalties, before truncation. Each random row draws from its own
`torch.Generator`, so a seeded request samples the same tokens in any batch.
"""

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 params: list[SamplingParams]) -> list[SampleResult]:
        logits = logits.float()
        if any(_edits_logits(seq, p) for seq, p in zip(seqs, params, strict=True)):
            logits = logits.clone()  # the caller's logits stay as they were
        for row, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            apply_penalties(logits[row], seq, p)
            self._apply_min_tokens(logits[row], seq, p)
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        if any(t != 1.0 for t in temps):
            logits.div_(torch.tensor(temps, device=logits.device)[:, None])
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        for row, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            if not p.greedy:
                tokens[row] = _draw(truncate(logits[row], p), seq.generator)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        results = []
        for row, (token, lp, p) in enumerate(zip(tokens.tolist(), chosen.tolist(), params,
                                                  strict=True)):
            top = None
            if p.logprobs:
                values, ids = logprobs[row].topk(p.logprobs)
                top = dict(zip(ids.tolist(), values.tolist(), strict=True))
                top[token] = lp
            results.append(SampleResult(token, lp, top))
        return results

    def _apply_min_tokens(self, row: torch.Tensor, seq: Sequence, p: SamplingParams) -> None:
        if seq.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            if banned:
                row[list(banned)] = -float("inf")


def _edits_logits(seq: Sequence, p: SamplingParams) -> bool:
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens or p.temperature not in (0.0, 1.0))


def apply_penalties(row: torch.Tensor, seq: Sequence, p: SamplingParams) -> None:
    """Repetition penalty over prompt and output (Transformers' rule); presence and
    frequency penalties over the output only (OpenAI's rule)."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        out = torch.tensor(seq.output_token_ids, device=row.device)
        counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def truncate(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Logits with everything outside top-k, the top-p nucleus and the min-p floor at -inf."""
    if p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0:
        return row
    row = row.clone()
    if 0 < p.top_k < row.shape[0]:
        kth = row.topk(p.top_k).values[-1]
        row[row < kth] = -float("inf")
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop = probs.cumsum(-1) - probs >= p.top_p
        row[order[drop]] = -float("inf")
    if p.min_p > 0.0:
        probs = row.softmax(-1)
        row[probs < p.min_p * probs.max()] = -float("inf")
    return row


def _draw(row: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from softmax(row) by the exponential race: argmax(p / E), E ~ Exp(1)."""
    probs = row.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()
