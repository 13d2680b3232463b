"""Turn next-token logits into tokens, one row per sequence.

Order of processing, as in vLLM: the grammar's token mask (structured output),
penalties, min_tokens, temperature, then top-k / top-p / min-p truncation.
Logprobs are taken after the mask, penalties and temperature, before
truncation. Each random row draws from its own `torch.Generator`, so a seeded
request samples the same tokens in any batch.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch

from engine.logprob import Logprob
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.structured_output import TokenMasks, apply_token_masks


@dataclass(slots=True)
class SampleResult:
    """A row's token; its logprob and top logprobs only when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None  # most likely first
    rank: int | None = None  # of the token, 1: the most likely


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 params: list[SamplingParams], masks: TokenMasks | None = None
                 ) -> list[SampleResult]:
        """Sample one token per row; the caller's logits stay as they were. Rows in `masks`
        sample only the tokens their grammar allows.

        Only rows that sample, edit their logits or want logprobs are copied to
        float32; log-softmax runs over the rows that want logprobs only. Random
        numbers are drawn last, after every operation that can fail: a call that
        raises leaves each sequence's generator untouched, so the engine can
        sample the same rows again and get the same tokens.
        """
        if logits.shape[0] != len(params):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(params)} requests")
        random_rows: list[int] = []
        greedy_rows: list[int] = []  # greedy rows that edit their logits or want logprobs
        plain_rows: list[int] = []  # greedy rows that take the argmax of their raw logits
        edited: list[int] = []
        constrained = set(masks.rows) if masks is not None else ()
        for row, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            edits = row in constrained or _edits_logits(seq, p)
            if edits:
                edited.append(row)
            if not p.greedy:
                random_rows.append(row)
            elif edits or p.logprobs is not None:
                greedy_rows.append(row)
            else:
                plain_rows.append(row)
        # Converting bf16 or fp16 to float32 is exact and keeps the order of the values, so
        # the argmax of the raw logits is the token a float32 argmax picks.
        if len(plain_rows) == len(params):
            return [SampleResult(token) for token in argmax_rows(logits).tolist()]

        # Random rows first: temperature divides one leading slice of `work`.
        rows = random_rows + greedy_rows
        work = self._edited_logits(logits, rows, len(random_rows), edited, seqs, params, masks)
        want = [i for i, row in enumerate(rows) if params[row].logprobs is not None]
        logprobs = top = None
        if want:
            logprobs = torch.log_softmax(work if len(want) == len(rows) else work[want], dim=-1)
            max_k = max(params[rows[i]].logprobs for i in want)
            if max_k:
                top = logprobs.topk(max_k)
        chosen = [argmax_rows(work[len(random_rows):])]
        if plain_rows:
            chosen.append(argmax_rows(logits[plain_rows]))
        probs = [truncate(work[i], params[row]).softmax(-1) for i, row in enumerate(random_rows)]
        drawn = [_draw(row_probs, seqs[row].generator)
                 for row, row_probs in zip(random_rows, probs, strict=True)]
        ordered = torch.cat([torch.stack(drawn), *chosen]) if drawn else torch.cat(chosen)
        tokens = [0] * len(params)
        for row, token in zip(rows + plain_rows, ordered.tolist(), strict=True):
            tokens[row] = token
        results = [SampleResult(token) for token in tokens]
        if logprobs is not None:
            _fill_logprobs(results, [rows[i] for i in want], params, logprobs, ordered[want], top)
        return results

    def _edited_logits(self, logits: torch.Tensor, rows: list[int], num_random: int,
                       edited: list[int], seqs: list[Sequence], params: list[SamplingParams],
                       masks: TokenMasks | None) -> torch.Tensor:
        """`rows` of the logits in float32, after the grammar's masks, penalties, min_tokens
        and (for the first `num_random` rows, the random ones) temperature; never the
        caller's tensor if edited."""
        in_order = rows == list(range(logits.shape[0]))
        work = (logits if in_order else logits[rows]).float()
        temps = [params[row].temperature for row in rows[:num_random]]
        scale = any(t != 1.0 for t in temps)
        if work is logits and (edited or scale):
            work = work.clone()
        local = {row: i for i, row in enumerate(rows)}
        if masks is not None:
            apply_token_masks(work, masks, [local[row] for row in masks.rows])
        for row in edited:
            apply_penalties(work[local[row]], seqs[row], params[row])
            self._apply_min_tokens(work[local[row]], seqs[row], params[row])
        if scale:
            work[:num_random].div_(torch.tensor(temps, device=work.device)[:, None])
        return work

    def _apply_min_tokens(self, row: torch.Tensor, seq: Sequence, p: SamplingParams) -> None:
        if seq.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            if not banned:
                return
            banned = list(banned)
            kept = row[banned].clone() if seq.matcher is not None else None
            row[banned] = -float("inf")
            # A grammar that allows only ending here wins over min_tokens.
            if kept is not None and torch.isneginf(row).all():
                row[banned] = kept


def _fill_logprobs(results: list[SampleResult], rows: list[int], params: list[SamplingParams],
                   logprobs: torch.Tensor, tokens: torch.Tensor,
                   top: torch.return_types.topk | None) -> None:
    """Give `results[rows]` their chosen token's logprob and, unless `p.logprobs` is 0,
    the top `p.logprobs` with the chosen token beside them."""
    chosen_values = logprobs.gather(1, tokens[:, None])
    ranks = ((logprobs > chosen_values).sum(1) + 1).tolist()
    chosen = chosen_values.squeeze(1).tolist()
    top_ids = top.indices.tolist() if top is not None else None
    top_values = top.values.tolist() if top is not None else None
    for i, (row, lp) in enumerate(zip(rows, chosen, strict=True)):
        res = results[row]
        res.logprob, res.rank = lp, ranks[i]
        k = params[row].logprobs
        if k:
            res.top_logprobs = dict(zip(top_ids[i][:k], top_values[i][:k], strict=True))
            res.top_logprobs[res.token_id] = lp


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of a [rows, vocab] tensor (the first maximum on ties), faster on the
    CPU, where argmax runs unvectorised: `amax` over blocks of each row finds the block
    holding the maximum, and argmax then searches that block alone."""
    rows, vocab = x.shape
    size = _argmax_block(vocab)
    if x.device.type != "cpu" or size is None or rows == 0:
        return x.argmax(-1)
    blocks = x.reshape(rows, vocab // size, size)
    best = blocks.amax(-1).argmax(-1)
    return best * size + blocks[torch.arange(rows), best].argmax(-1)


@lru_cache
def _argmax_block(vocab: int) -> int | None:
    """The largest divisor of `vocab` in [32, 128] (a block size that keeps both passes
    short), or None."""
    return next((size for size in range(128, 31, -1) if vocab % size == 0), None)


def _edits_logits(seq: Sequence, p: SamplingParams) -> bool:
    """Whether penalties or min_tokens change this row's logits (temperature aside)."""
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens)


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


def prompt_logprobs(logits: torch.Tensor, tokens: list[int], k: int
                    ) -> list[dict[int, Logprob]]:
    """Each row's logprob and rank of the prompt token that follows it, beside the row's
    top `k` (ranks 1..k)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])
    ranks = ((logprobs > chosen).sum(1) + 1).tolist()
    top = logprobs.topk(k) if k else None
    top_ids = top.indices.tolist() if top is not None else [[]] * len(tokens)
    top_values = top.values.tolist() if top is not None else [[]] * len(tokens)
    positions = []
    for token, value, rank, ids, values in zip(tokens, chosen.squeeze(1).tolist(), ranks,
                                               top_ids, top_values, strict=True):
        position = {t: Logprob(v, r) for r, (t, v) in enumerate(zip(ids, values, strict=True), 1)}
        position[token] = Logprob(value, rank)
        positions.append(position)
    return positions
