"""Physical KV blocks: allocation, reference counts, copy-on-write, swapping, prefix caching.

Plain Python over block ids; the tensors behind the ids live in the cache engine.
Every mutation that needs data moved returns or records an explicit src -> dst
mapping for the cache engine to execute.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.sequence import Sequence, SequenceGroup

# A block-table entry whose block fell behind the attention window: freed, never read
# again (the attention kernels start at the window).
FREED = -1


class BlockPool:
    """The blocks of one device with their reference counts.

    Free blocks wait in least-recently-freed order, so a freed block that still
    holds a cached prefix is the last to be reused (LRU eviction).
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("block pool exhausted; callers must check num_free first")
        block, _ = self._free.popitem(last=False)
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free[block] = None


@dataclass(slots=True)
class CachedBlock:
    """What a cached block holds: its chain hash, its parent block and its tokens."""

    block_hash: int
    parent: int | None
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """The cached full blocks a prompt can reuse, as `find_cached_prefix` found them."""

    blocks: tuple[int, ...] = ()
    num_tokens: int = 0
    # Blocks of the prefix that sit in the free list: taking each uses up a free block.
    num_free_blocks: int = 0


class BlockManager:
    def __init__(
        self,
        block_size: int,
        num_device_blocks: int,
        num_cpu_blocks: int,
        enable_prefix_caching: bool = True,
        share_blocks: bool = True,
        window: int | None = None,
    ) -> None:
        """`window`: every layer of the model attends to at most the last `window`
        tokens, so the blocks behind that are freed as a sequence moves on."""
        self.block_size = block_size
        self.window = window
        self.device = BlockPool(num_device_blocks)
        self.cpu = BlockPool(num_cpu_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        # Off only to measure what sharing saves: forks then copy every block.
        self.share_blocks = share_blocks
        self._on_cpu: set[int] = set()  # ids of the sequences whose table is in `cpu`
        self._cached: dict[int, CachedBlock] = {}
        self._by_hash: dict[int, int] = {}
        # Sequences whose block table changed since the last `take_changed`: the runner
        # rewrites only their rows of its persistent block-table array.
        self._changed: dict[int, Sequence] = {}
        self.num_cow_copies = 0
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ---- sizing -------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Device blocks needed to write `num_new_tokens` more tokens into `seq`."""
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        needed -= len(seq.block_table)
        return (needed if needed > 0 else 0) + self._needs_cow(seq)

    def _needs_cow(self, seq: Sequence) -> bool:
        offset = seq.num_computed_tokens % self.block_size
        if offset == 0 or not seq.block_table:
            return False
        last = seq.block_table[seq.num_computed_tokens // self.block_size]
        return self.device.ref_counts[last] > 1

    def take_changed(self) -> dict[int, Sequence]:
        """The sequences (by id) whose block table changed since the last call."""
        changed, self._changed = self._changed, {}
        return changed

    # ---- allocation ---------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       copies: list[tuple[int, int]]) -> None:
        """Give `seq` room for `num_new_tokens`; a shared partly filled block is copied first.

        Copies are (src, dst) pairs: one source block can be copied for several forks.
        """
        if seq.num_computed_tokens % self.block_size and self._needs_cow(seq):
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            dst = self._allocate_device()
            self.device.decref(src)
            seq.block_table[idx] = dst
            copies.append((src, dst))
            self.num_cow_copies += 1
            self._changed[seq.seq_id] = seq
        target = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        if len(seq.block_table) < target:
            self._changed[seq.seq_id] = seq
            while len(seq.block_table) < target:
                seq.block_table.append(self._allocate_device())

    def free(self, seq: Sequence) -> None:
        pool = self.cpu if seq.seq_id in self._on_cpu else self.device
        self._on_cpu.discard(seq.seq_id)
        for block in seq.block_table:
            if block != FREED:
                pool.decref(block)
        seq.block_table = []
        self._changed[seq.seq_id] = seq

    def free_behind_window(self, seq: Sequence) -> None:
        """Free the blocks of a running `seq` that no query of it can see anymore: its
        next query sits at position num_computed_tokens and sees back to there minus
        window plus one. A no-op unless every layer is windowed."""
        if self.window is None:
            return
        table = seq.block_table
        visible_from = max(seq.num_computed_tokens - self.window + 1, 0)
        i = min(visible_from // self.block_size, len(table)) - 1
        if i < 0 or table[i] == FREED:
            return
        while i >= 0 and table[i] != FREED:  # the blocks before were freed earlier
            self.device.decref(table[i])
            table[i] = FREED
            i -= 1
        self._changed[seq.seq_id] = seq

    def fork(self, parent: Sequence, child: Sequence, copies: list[tuple[int, int]]) -> None:
        """Give `child` the parent's blocks: shared, or (sharing off) copied into its own."""
        self._changed[child.seq_id] = child
        if not self.share_blocks and self.device.num_free >= len(parent.block_table):
            child.block_table = [FREED if b == FREED else self._allocate_device()
                                 for b in parent.block_table]
            copies.extend((src, dst) for src, dst in
                          zip(parent.block_table, child.block_table, strict=True)
                          if src != FREED)
            return
        child.block_table = list(parent.block_table)
        self._incref_all(child.block_table)

    def adopt_prefix(self, source: Sequence, seq: Sequence) -> None:
        """Share with `seq` the computed full blocks of `source` that hold its own first
        tokens."""
        num_blocks = self.count_shared_blocks(source.token_ids, source.num_computed_tokens, seq)
        seq.block_table = source.block_table[:num_blocks]
        self._changed[seq.seq_id] = seq
        self._incref_all(seq.block_table)
        seq.num_computed_tokens = num_blocks * self.block_size

    def _incref_all(self, table: list[int]) -> None:
        for block in table:
            if block != FREED:
                self.device.incref(block)

    def count_shared_blocks(self, tokens: list[int], num_computed_tokens: int,
                            seq: Sequence) -> int:
        """Full blocks of a sequence holding `tokens`, computed up to `num_computed_tokens`,
        that also hold `seq`'s first tokens (always leaving `seq` a token to compute, so
        its step yields logits)."""
        limit = min(num_computed_tokens, seq.num_tokens - 1)
        common = 0
        while common < limit and tokens[common] == seq.token_ids[common]:
            common += 1
        return common // self.block_size

    def _allocate_device(self) -> int:
        block = self.device.allocate()
        cached = self._cached.pop(block, None)
        if cached is not None:
            del self._by_hash[cached.block_hash]
        return block

    # ---- swapping -----------------------------------------------------------

    def _distinct_blocks(self, group: SequenceGroup) -> list[int]:
        return list(dict.fromkeys(b for s in group.live_seqs() for b in s.block_table
                                  if b != FREED))

    def can_swap_out(self, group: SequenceGroup) -> bool:
        return len(self._distinct_blocks(group)) <= self.cpu.num_free

    def can_swap_in(self, group: SequenceGroup, reserve: int = 0) -> bool:
        return len(self._distinct_blocks(group)) + reserve <= self.device.num_free

    def swap_out(self, group: SequenceGroup, moved: dict[int, int] | None = None
                 ) -> dict[int, int]:
        self._on_cpu.update(s.seq_id for s in group.live_seqs())
        return self._move(group, self.device, self.cpu, self.cpu.allocate, moved)

    def swap_in(self, group: SequenceGroup, moved: dict[int, int] | None = None
                ) -> dict[int, int]:
        self._on_cpu.difference_update(s.seq_id for s in group.live_seqs())
        return self._move(group, self.cpu, self.device, self._allocate_device, moved)

    def _move(self, group: SequenceGroup, src: BlockPool, dst: BlockPool,
              allocate: Callable[[], int], moved: dict[int, int] | None) -> dict[int, int]:
        """Move every block of the group once, keeping shared blocks shared.

        `moved` holds the blocks already moved this step; a block shared with an
        earlier group is not copied again but shared on the other side too.
        """
        mapping: dict[int, int] = dict(moved or {})
        for seq in group.live_seqs():
            new_table = []
            for block in seq.block_table:
                if block == FREED:
                    new_table.append(FREED)
                    continue
                if block in mapping:
                    dst.incref(mapping[block])
                else:
                    mapping[block] = allocate()
                src.decref(block)
                new_table.append(mapping[block])
            seq.block_table = new_table
            self._changed[seq.seq_id] = seq
        return {b: mapping[b] for b in mapping if not moved or b not in moved}

    # ---- prefix caching -----------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """The cached blocks of the prompt's longest cached prefix; changes nothing.

        At least one prompt token is left to compute so the step yields logits.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return CachedPrefix()
        tokens = seq.token_ids
        bs = self.block_size
        blocks: list[int] = []
        parent: int | None = None
        block_hash: int | None = None
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            block_hash = self.hash_block(block_hash, chunk)
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            cached = self._cached[block]
            # A hash collision must never hand out another prefix's KV.
            if cached.parent != parent or cached.tokens != chunk:
                break
            blocks.append(block)
            parent = block
        num_free = sum(1 for b in blocks if self.device.ref_counts[b] == 0)
        return CachedPrefix(tuple(blocks), len(blocks) * bs, num_free)

    def allocate_prefix(self, seq: Sequence, prefix: CachedPrefix) -> None:
        """Take `prefix` for `seq`, which holds no blocks, and count the lookup in the hit
        rate: once per admission, so a request waiting for room is not counted each step.

        `prefix` must come from `find_cached_prefix` with no block taken or freed since.
        """
        for block in prefix.blocks:
            self.device.incref(block)
        seq.block_table = list(prefix.blocks)
        seq.num_computed_tokens = prefix.num_tokens
        self._changed[seq.seq_id] = seq
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += prefix.num_tokens

    def cache_full_blocks(self, seq: Sequence, num_new_tokens: int) -> None:
        """Register the blocks that the step's `num_new_tokens` fill.

        Done at scheduling time: a request admitted later in the same step may reuse
        them, because every layer stores the step's K/V before it attends.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        last = (seq.num_computed_tokens + num_new_tokens) // bs
        for i in range(first, last):
            block = seq.block_table[i]
            if block in self._cached:
                continue
            parent = seq.block_table[i - 1] if i else None
            parent_hash = self._cached[parent].block_hash if parent in self._cached else None
            if i and parent_hash is None:
                return  # the chain is broken (parent not cached): nothing after it can be
            chunk = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block_hash = self.hash_block(parent_hash, chunk)
            if block_hash in self._by_hash:
                continue
            self._by_hash[block_hash] = block
            self._cached[block] = CachedBlock(block_hash, parent, chunk)

    def uncache(self, blocks: Iterable[int]) -> None:
        """Drop `blocks` from the prefix cache (their KV was never written, or is wrong)."""
        for block in blocks:
            cached = self._cached.pop(block, None)
            if cached is not None:
                del self._by_hash[cached.block_hash]

    @staticmethod
    def hash_block(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent_hash, tokens))

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
