"""How many blocks and tokens a request needs: the scheduler's arithmetic, apart from
its policy. Finding out takes nothing: the block manager's state is only read."""

from engine.block_manager import BlockManager, CachedPrefix
from engine.sequence import Sequence, SequenceGroup


class BlockNeeds:
    bm: BlockManager

    @staticmethod
    def _split_budget(needs: list[int], budget: int) -> list[int]:
        """Tokens each of a group's sequences computes this step, given what each needs."""
        if sum(needs) <= budget:
            return needs
        if len(needs) == 1:
            return [budget]
        # Several sequences (samples or beams) must reach their last token in the same
        # step to be sampled together, so a partial plan keeps one token back on each.
        takes = []
        for need in needs:
            take = max(min(need - 1, budget), 0)
            takes.append(take)
            budget -= take
        return takes

    def _swap_in_reserve(self, plan: list[tuple[Sequence, int]]) -> int:
        """Blocks a resumed group needs beyond its own: new blocks for the step, and
        k - 1 copies of a partly filled block that k of its sequences will write."""
        bs = self.bm.block_size
        new = sum(max(self.bm.blocks_for(s.num_computed_tokens + n) - len(s.block_table), 0)
                  for s, n in plan)
        written = [s.block_table[s.num_computed_tokens // bs] for s, _ in plan
                   if s.num_computed_tokens % bs]
        return new + len(written) - len(set(written))

    def _min_blocks(self, group: SequenceGroup) -> int:
        """The fewest blocks the group's sequences need: the prompt's full blocks once;
        under a window, what one sequence holds at most once those behind it are freed."""
        seqs = group.live_seqs()
        if self.bm.window is not None:
            held = self.bm.blocks_for(self.bm.window) + 1
            return sum(min(self.bm.blocks_for(s.num_tokens), held) for s in seqs)
        shared = group.seqs[0].prompt_len // self.bm.block_size if len(seqs) > 1 else 0
        return shared + sum(self.bm.blocks_for(s.num_tokens) - shared for s in seqs)

    def _admission_blocks(self, group: SequenceGroup, prefix: CachedPrefix,
                          budget: int) -> int | None:
        """Free device blocks a waiting group's first step uses, `prefix` included, found
        without taking anything (None: no token of it fits the budget).

        It is what _plan_tokens and _recompute_shared will plan once the prefix is taken,
        worked out for a group that holds no blocks: the first sequence starts after its
        cached prefix; when that leaves it one token, its siblings adopt what they share.
        """
        leader, *siblings = group.live_seqs()
        starts = [prefix.num_tokens]
        uncomputed = leader.num_tokens - prefix.num_tokens
        if siblings and uncomputed > 1:
            takes = [min(uncomputed - 1, budget)]
        else:
            bs = self.bm.block_size
            starts += [self.bm.count_shared_blocks(leader.token_ids, prefix.num_tokens, s) * bs
                       for s in siblings]
            seqs = [leader, *siblings]
            needs = [s.num_tokens - start for s, start in zip(seqs, starts, strict=True)]
            takes = self._split_budget(needs, budget)
        if not any(takes):
            return None
        # Every start is a whole number of blocks, all of them already held.
        new = sum(self.bm.blocks_for(start + n) - self.bm.blocks_for(start)
                  for start, n in zip(starts, takes, strict=True))
        return prefix.num_free_blocks + new
