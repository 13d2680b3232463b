"""CUDA graphs for decode steps: one graph per batch-size bucket, captured once.

A decode step launches a few hundred small kernels; replaying a graph removes
the launch gaps. Batches are padded up to the next bucket: padded rows write
to slot -1 (skipped) and have an empty context, so they touch nothing.
"""

import logging

import torch

from engine.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (vLLM's spacing)."""
    small = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    return small + list(range(16, max_num_seqs + 1, 16))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, max_num_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.buckets = batch_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b], query_start_loc=self.query_start_loc[:b + 1],
            max_query_len=1, max_seq_len=self.max_model_len, num_decodes=b,
            seq_lens_cpu=[], query_lens_cpu=[],
        )

    def _forward(self, b: int) -> None:
        meta = self._meta(b)
        # A graph-capable backend's plan reads only these static tensors, so the plan
        # captured here stays valid for every replay.
        self.backend.prepare(meta)
        self.hidden[:b] = self.model(self.input_ids[:b], self.positions[:b], meta)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so the smaller graphs reuse the largest one's memory.
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, num_seqs: int, max_query_len: int) -> bool:
        return max_query_len == 1 and num_seqs <= self.buckets[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        b = next(size for size in self.buckets if size >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:b] = -1
        self.block_tables[:n, :width] = meta.block_tables
        self.seq_lens[:n] = meta.seq_lens
        self.seq_lens[n:b] = 0
        self.graphs[b].replay()
        return self.hidden[:n]
