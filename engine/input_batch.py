"""Block tables kept across steps as rows of one array (vLLM V1's persistent batch).

A sequence gets a row when it is first scheduled; the row is rewritten only when
the block manager reports that the sequence's table changed (a new block, a
copy-on-write, a swap, a free), and given back when the table is freed or
swapped out. A decode step thus reads its block tables and slot mapping with
array indexing instead of rebuilding them from Python lists.
"""

import numpy as np

from engine.sequence import Sequence, SequenceStatus


class BlockTables:
    def __init__(self, max_blocks_per_seq: int, num_rows: int = 64) -> None:
        self.array = np.zeros((num_rows, max_blocks_per_seq), dtype=np.int64)
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def apply_changes(self, changed: dict[int, Sequence]) -> None:
        """Rewrite the rows of changed tables; free those no longer on the device."""
        for seq_id, seq in changed.items():
            row = self.row_of.get(seq_id)
            if row is None:
                continue
            if seq.block_table and seq.status is SequenceStatus.RUNNING:
                self._write(row, seq.block_table)
            else:
                del self.row_of[seq_id]
                self._free_rows.append(row)

    def rows(self, seqs: list[Sequence]) -> np.ndarray:
        """The rows of `seqs`, in order; a sequence seen for the first time gets one."""
        row_of = self.row_of
        rows = [row_of.get(seq.seq_id, -1) for seq in seqs]
        if -1 in rows:
            rows = [row if row >= 0 else self._add(seq) for row, seq in zip(rows, seqs,
                                                                           strict=True)]
        return np.array(rows, dtype=np.int64)

    def _add(self, seq: Sequence) -> int:
        if not self._free_rows:
            old = len(self.array)
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self._free_rows.pop()
        self.row_of[seq.seq_id] = row
        self._write(row, seq.block_table)
        return row

    def _write(self, row: int, table: list[int]) -> None:
        self.array[row, :len(table)] = table
