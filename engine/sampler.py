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
        """Sample one token per row; the caller's logits stay as they were.

        Random numbers are drawn last, after every operation that can fail: a call
        that raises leaves each sequence's generator untouched, so the engine can
        sample the same rows again and get the same tokens.
        """
        work = logits.float()
        if work is logits and any(_edits_logits(seq, p)
                                  for seq, p in zip(seqs, params, strict=True)):
            work = work.clone()
        for row, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            apply_penalties(work[row], seq, p)
            self._apply_min_tokens(work[row], seq, p)
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        if any(t != 1.0 for t in temps):
            work.div_(torch.tensor(temps, device=work.device)[:, None])
        logprobs = torch.log_softmax(work, dim=-1)
        tokens = work.argmax(dim=-1)
        tops = [logprobs[row].topk(p.logprobs) if p.logprobs else None
                for row, p in enumerate(params)]
        random_rows = [row for row, p in enumerate(params) if not p.greedy]
        probs = [truncate(work[row], params[row]).softmax(-1) for row in random_rows]
        for row, row_probs in zip(random_rows, probs, strict=True):
            tokens[row] = _draw(row_probs, seqs[row].generator)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        results = []
        for token, lp, top in zip(tokens.tolist(), chosen.tolist(), tops, strict=True):
            top_logprobs = None
            if top is not None:
                top_logprobs = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                top_logprobs[token] = lp
            results.append(SampleResult(token, lp, top_logprobs))
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


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from `probs` by the exponential race: argmax(p / E), E ~ Exp(1)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()
