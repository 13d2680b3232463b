"""One rank's part of a tensor-parallel model: which heads, columns and vocabulary rows
it holds, and the collectives that put the parts back together.

A model built with `Shard()` (one rank) is the whole model and every collective is
a no-op, so the layers are written once for both cases.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


def split(n: int, size: int, rank: int) -> range:
    """Rank `rank`'s contiguous part of n items: the first n % size ranks take one more."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True, slots=True)
class Shard:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")  # where this rank's collectives run

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[range, range]:
        """(query heads, KV heads) of this rank. KV heads are split as evenly as they go,
        each taking its group of query heads along (9 over 3 on two ranks: 6 + 3); with
        fewer KV heads than ranks, each KV head is held by size / num_kv_heads ranks,
        which split its query heads."""
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} attention heads do not group over "
                             f"{num_kv_heads} KV heads")
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.size:
            kv = split(num_kv_heads, self.size, self.rank)
            return range(kv.start * group, kv.stop * group), kv
        replicas = self.size // num_kv_heads
        if self.size % num_kv_heads or group % replicas:
            raise ValueError(
                f"tensor_parallel_size {self.size} cannot split {num_heads} attention heads "
                f"over {num_kv_heads} KV heads: with fewer KV heads than ranks, the ranks "
                "must be a multiple of the KV heads and share each one's query heads evenly")
        kv_head = self.rank // replicas
        per_rank = group // replicas
        start = kv_head * group + self.rank % replicas * per_rank
        return range(start, start + per_rank), range(kv_head, kv_head + 1)

    def part(self, n: int) -> range:
        """This rank's part of n columns (an MLP's intermediate size)."""
        return split(n, self.size, self.rank)

    def vocab(self, vocab_size: int) -> range:
        """This rank's vocabulary rows; every rank holds ceil(vocab / size) rows, the
        last one's tail padding, so that the logit parts gather as equal tensors."""
        per_rank = -(-vocab_size // self.size)
        start = self.rank * per_rank
        return range(start, min(start + per_rank, vocab_size))

    def vocab_rows(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (a row-parallel layer's partial outputs)."""
        if self.group is not None:
            self.group.allreduce([x]).wait()
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dimension (the vocabulary parts of
        the logits)."""
        if self.group is None:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int) -> int:
        """The smallest value any rank holds (the KV pool: the smallest rank decides)."""
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.group.allreduce([t], opts).wait()
        return int(t.item())


ONE_RANK = Shard()  # the whole model, no collectives
