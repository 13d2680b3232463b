"""Build the step's tensors (input_ids, positions, slot_mapping, block_tables, seq_lens)
and run the model; return the logits of the sequences that sample this step."""

from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.cuda_graph import DecodeGraphs
from engine.scheduler import ScheduledSeq


@dataclass(slots=True)
class ModelInput:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    sampled: list[ScheduledSeq]      # the entries whose last token yields logits, in row order


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self, max_num_seqs: int, max_model_len: int, hidden_size: int,
                       dtype: torch.dtype) -> None:
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.backend, max_num_seqs, max_blocks,
                                   max_model_len, hidden_size, dtype, self.device)

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, max_model_len: int, num_logits: int,
                            num_kv_heads: int, dtype: torch.dtype) -> int:
        """Peak bytes of one maximal step (weights included), run on a scratch cache."""
        bs = self.block_size
        seq_lens = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens,
                                                                          max_model_len)]
        num_blocks = sum(-(-n // bs) for n in seq_lens)
        layers = len(self.model.layers)
        scratch = torch.zeros(layers, 2, num_blocks, bs, num_kv_heads, self.model.head_dim,
                              dtype=dtype, device=self.device)
        self.model.bind_kv_cache(scratch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tables, first = [], 0
        for n in seq_lens:
            tables.append(list(range(first, first + -(-n // bs))))
            first += len(tables[-1])
        width = max(map(len, tables))
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            query_start_loc=self._tensor(starts, torch.int32),
            max_query_len=max(seq_lens), max_seq_len=max(seq_lens), num_decodes=0,
            seq_lens_cpu=seq_lens, query_lens_cpu=seq_lens,
        )
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in seq_lens])
        hidden = self._forward(ids, positions, meta)
        logits = self.model.compute_logits(hidden[:num_logits])
        torch.softmax(logits, dim=-1)  # the sampler's largest temporary
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * dtype.itemsize
        del scratch, hidden, logits
        torch.cuda.empty_cache()
        return peak

    def prepare(self, scheduled: list[ScheduledSeq]) -> ModelInput:
        # Decodes first, as AttentionMetadata promises: a backend may batch them in one call.
        batch = sorted(scheduled, key=lambda s: s.num_tokens != 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        logits_indices: list[int] = []
        sampled: list[ScheduledSeq] = []
        for entry in batch:
            seq, n = entry.seq, entry.num_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_lens.append(n)
            if end == seq.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                sampled.append(entry)
        max_blocks = max(len(e.seq.block_table) for e in batch)
        tables = [e.seq.block_table + [0] * (max_blocks - len(e.seq.block_table)) for e in batch]
        query_start = [0]
        for n in query_lens:
            query_start.append(query_start[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            query_start_loc=self._tensor(query_start, torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=sum(1 for n in query_lens if n == 1),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=query_lens,
        )
        return ModelInput(self._tensor(input_ids, torch.int64),
                          self._tensor(positions, torch.int64), meta,
                          self._tensor(logits_indices, torch.int64), sampled)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, list[ScheduledSeq]]:
        inp = self.prepare(scheduled)
        hidden = self._forward(inp.input_ids, inp.positions, inp.meta)
        if not inp.sampled:
            return hidden.new_empty((0, 0)), []
        return self.model.compute_logits(hidden[inp.logits_indices]), inp.sampled

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        self.backend.prepare(meta)  # once per forward, before any layer attends
        if self.graphs is not None and self.graphs.can_run(len(meta.seq_lens_cpu),
                                                           meta.max_query_len):
            return self.graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)
