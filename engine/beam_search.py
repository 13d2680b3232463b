"""Beam search inside the engine, with Transformers' semantics.

Each step pools the candidates of all live beams of a request: the top
`max(2, 1 + num_stop_tokens) * beam_width` continuations by cumulative logprob.
The best `beam_width` that do not end the sequence become the next beams
(forked through the block manager, so beams share their common blocks);
those among the first `beam_width` that end it (a stop token, or the length
limit) compete for the `beam_width` finished slots by their length-penalised
score `cumulative_logprob / num_generated ** length_penalty`.
"""

from dataclasses import dataclass, field

import torch

from engine.sampling_params import BeamSearchParams


@dataclass(slots=True)
class Hypothesis:
    token_ids: list[int]
    cumulative_logprob: float
    score: float
    stopped: bool  # ended on a stop token, not on the length limit


@dataclass(slots=True)
class Candidate:
    parent: int          # index of the beam it extends
    token_id: int
    cumulative_logprob: float


@dataclass(slots=True)
class BeamState:
    params: BeamSearchParams
    stop_token_ids: set[int]
    finished: list[Hypothesis] = field(default_factory=list)
    improvement_possible: bool = True
    done: bool = False

    @property
    def pool_full(self) -> bool:
        return len(self.finished) >= self.params.beam_width

    def step(self, logits: torch.Tensor, cumulative: list[float], outputs: list[list[int]],
             at_length_limit: bool) -> list[Candidate]:
        """One beam step for beams with `logits` [num_beams, vocab]; returns the next beams.

        `outputs` are the beams' generated tokens so far; `at_length_limit` means the
        token chosen now is the last one allowed.
        """
        width = self.params.beam_width
        vocab = logits.shape[-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logprobs += torch.tensor(cumulative, device=logprobs.device)[:, None]
        k = max(2, 1 + len(self.stop_token_ids)) * width
        values, indices = logprobs.flatten().topk(min(k, logprobs.numel()))
        candidates = [Candidate(i // vocab, i % vocab, v)
                      for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
        num_generated = len(outputs[0]) + 1
        ends = [at_length_limit or c.token_id in self.stop_token_ids for c in candidates]
        self._collect_finished(candidates[:width], ends[:width], outputs, num_generated)
        running = [c for c, end in zip(candidates, ends, strict=True) if not end][:width]
        self._update_done(running, num_generated, all(ends))
        return [] if self.done else running

    def _collect_finished(self, candidates: list[Candidate], ends: list[bool],
                          outputs: list[list[int]], num_generated: int) -> None:
        if not self.improvement_possible or (self.pool_full and self.params.early_stopping):
            return
        for cand, end in zip(candidates, ends, strict=True):
            if end:
                score = cand.cumulative_logprob / num_generated**self.params.length_penalty
                tokens = [*outputs[cand.parent], cand.token_id]
                stopped = cand.token_id in self.stop_token_ids
                self.finished.append(Hypothesis(tokens, cand.cumulative_logprob, score, stopped))
        # Stable sort: on equal scores the earlier hypothesis stays ahead, as in Transformers.
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.params.beam_width:]

    def _update_done(self, running: list[Candidate], num_generated: int, all_end: bool) -> None:
        if self.pool_full and running:
            best = running[0].cumulative_logprob / num_generated**self.params.length_penalty
            self.improvement_possible &= best > self.finished[-1].score
        self.done = (all_end or not running or not self.improvement_possible
                     or (self.pool_full and self.params.early_stopping))
