"""A request's sequences: its group with a first sequence, the n samples it forks into
after its prompt, and the beams that replace each other at every beam step. Forks share
their parent's blocks (copy-on-write); the block copies they need wait in `copies`.
"""

import itertools
import random
import time

import torch
from transformers import PreTrainedTokenizerBase

from engine import detokenizer
from engine.beam_search import BeamState, BeamStep
from engine.block_manager import BlockManager
from engine.request_checks import Params, Prompt
from engine.sampling_params import BeamSearchParams, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import RequestMetrics, Sequence, SequenceGroup, SequenceStatus


class SequenceFactory:
    def __init__(self, device: torch.device, tokenizer: PreTrainedTokenizerBase | None,
                 eos_token_ids: set[int], block_manager: BlockManager, scheduler: Scheduler,
                 seed: int) -> None:
        self.device = device
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.copies: list[tuple[int, int]] = []  # executed before the next forward
        self._seq_ids = itertools.count()
        self._rng = random.Random(seed)  # seeds of the requests that bring none

    def new_group(self, request_id: str, prompt: Prompt, token_ids: list[int], params: Params,
                  priority: int, deadline: float | None) -> SequenceGroup:
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
        generator = None
        if isinstance(group.params, SamplingParams) and not group.params.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed((group.seed + index) % 2**64)
        token_ids = group.prompt_token_ids
        seq = Sequence(next(self._seq_ids), list(token_ids), len(token_ids), generator, index)
        if self.tokenizer is not None:
            detokenizer.start(seq)
        return seq

    def fork_samples(self, group: SequenceGroup, seq: Sequence) -> list[Sequence]:
        """After the prompt, a request with n > 1 forks into n sequences sharing its blocks."""
        if group.params.n == 1 or len(group.seqs) > 1:
            return [seq]
        group.seqs.extend(self._fork(group, seq, i) for i in range(1, group.params.n))
        return group.seqs

    def _fork(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        """A running copy of `parent` that shares its blocks (copy-on-write)."""
        child = self.new_seq(group, index)
        child.token_ids = list(parent.token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.cumulative_logprob = parent.cumulative_logprob
        child.status = SequenceStatus.RUNNING
        self.block_manager.fork(parent, child, self.copies)
        return child

    def step_beams(self, group: SequenceGroup, step: BeamStep) -> None:
        """Replace the group's beams by the next ones: reuse a parent for its first
        continuation, fork it for the others, free the parents nobody continues."""
        beams = group.seqs
        group.beam.apply(step)
        taken: set[int] = set()
        new_beams = []
        for i, cand in enumerate(step.beams):
            parent = beams[cand.parent]
            beam = self._fork(group, parent, i) if cand.parent in taken else parent
            taken.add(cand.parent)
            new_beams.append(beam)
        for i, (beam, cand) in enumerate(zip(new_beams, step.beams, strict=True)):
            beam.index = i
            beam.token_ids.append(cand.token_id)
            beam.cumulative_logprob = cand.cumulative_logprob
        for i, beam in enumerate(beams):
            if i not in taken:
                self.scheduler.free_seq(beam)
                beam.status = SequenceStatus.FINISHED_STOPPED
        group.seqs = new_beams
