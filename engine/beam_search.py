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
class BeamStep:
    """One beam step's outcome, computed without touching the state, so a step can be
    computed again (or dropped) before it is applied."""

    beams: list[Candidate]       # the next beams; empty once the search is done
    finished: list[Hypothesis]
    improvement_possible: bool
    done: bool


@dataclass(slots=True)
class BeamState:
    params: BeamSearchParams
    stop_token_ids: set[int]
    finished: list[Hypothesis] = field(default_factory=list)
    improvement_possible: bool = True
    done: bool = False

    def step(self, logits: torch.Tensor, cumulative: list[float], outputs: list[list[int]],
             at_length_limit: bool) -> BeamStep:
        """One beam step for beams with `logits` [num_beams, vocab]; changes nothing.

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
        finished = self._collect_finished(candidates[:width], ends[:width], outputs,
                                          num_generated)
        running = [c for c, end in zip(candidates, ends, strict=True) if not end][:width]
        improvement = self._improvement_possible(running, num_generated, finished)
        done = (all(ends) or not running or not improvement
                or (len(finished) >= width and self.params.early_stopping))
        return BeamStep([] if done else running, finished, improvement, done)

    def apply(self, step: BeamStep) -> None:
        self.finished = step.finished
        self.improvement_possible = step.improvement_possible
        self.done = step.done

    def _collect_finished(self, candidates: list[Candidate], ends: list[bool],
                          outputs: list[list[int]], num_generated: int) -> list[Hypothesis]:
        """The finished pool after this step's ending candidates compete for it."""
        width = self.params.beam_width
        if not self.improvement_possible or (len(self.finished) >= width
                                             and self.params.early_stopping):
            return self.finished
        finished = list(self.finished)
        for cand, end in zip(candidates, ends, strict=True):
            if end:
                score = cand.cumulative_logprob / num_generated**self.params.length_penalty
                tokens = [*outputs[cand.parent], cand.token_id]
                stopped = cand.token_id in self.stop_token_ids
                finished.append(Hypothesis(tokens, cand.cumulative_logprob, score, stopped))
        # Stable sort: on equal scores the earlier hypothesis stays ahead, as in Transformers.
        finished.sort(key=lambda h: -h.score)
        return finished[:width]

    def _improvement_possible(self, running: list[Candidate], num_generated: int,
                              finished: list[Hypothesis]) -> bool:
        if len(finished) < self.params.beam_width or not running:
            return self.improvement_possible
        best = running[0].cumulative_logprob / num_generated**self.params.length_penalty
        return self.improvement_possible and best > finished[-1].score
