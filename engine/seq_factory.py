"""A request's sequences: its group with a first sequence, and the copies of a sequence
that samples (n > 1) and beams fork into. Plain objects: the scheduler gives them blocks.
"""

import itertools
import random
import time

import torch
from transformers import PreTrainedTokenizerBase

from engine import detokenizer
from engine.beam_search import BeamState
from engine.request_checks import Params, Prompt
from engine.sampling_params import BeamSearchParams, SamplingParams
from engine.sequence import RequestMetrics, Sequence, SequenceGroup, SequenceStatus
from engine.structured_output import Grammar


class SequenceFactory:
    def __init__(self, device: torch.device, tokenizer: PreTrainedTokenizerBase | None,
                 eos_token_ids: set[int], seed: int) -> None:
        self.device = device
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._seq_ids = itertools.count()
        self._rng = random.Random(seed)  # seeds of the requests that bring none

    def new_group(self, request_id: str, prompt: Prompt, token_ids: list[int], params: Params,
                  priority: int, deadline: float | None, grammar: Grammar | None = None
                  ) -> SequenceGroup:
        """A request's group with its first sequence; draws its seed and sequence id."""
        seed = getattr(params, "seed", None)
        group = SequenceGroup(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=token_ids,
            params=params,
            seqs=[],
            metrics=RequestMetrics(arrival_time=time.time(), num_prompt_tokens=len(token_ids)),
            priority=priority,
            deadline=deadline,
            seed=seed if seed is not None else self._rng.getrandbits(62),
            grammar=grammar,
        )
        if isinstance(params, BeamSearchParams):
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos
                                                  else self.eos_token_ids)
            group.beam = BeamState(params, stops)
        group.seqs.append(self.new_seq(group, 0))
        return group

    def new_seq(self, group: SequenceGroup, index: int) -> Sequence:
        """Sequence `index` of a request; sample i of a seeded request draws with seed + i
        (modulo 2**64, the generator's seed range)."""
        params = group.params
        sampling = isinstance(params, SamplingParams)
        generator = None
        if sampling and not params.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed((group.seed + index) % 2**64)
        token_ids = group.prompt_token_ids
        seq = Sequence(next(self._seq_ids), list(token_ids), len(token_ids), generator, index)
        if self.tokenizer is not None and sampling and params.needs_incremental_text:
            detokenizer.start(seq)
        return seq

    def clone(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        """Sequence `index` of `group`, running, with `parent`'s tokens, a copy of its
        grammar matcher and no blocks yet (the scheduler shares the parent's)."""
        child = self.new_seq(group, index)
        child.token_ids = list(parent.token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.cumulative_logprob = parent.cumulative_logprob
        child.status = SequenceStatus.RUNNING
        if parent.matcher is not None:
            child.matcher = parent.matcher.fork()
        return child
