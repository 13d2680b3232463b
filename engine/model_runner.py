"""Build the step's tensors (input_ids, positions, slot_mapping, block_tables, seq_lens)
and run the model; return the logits of the sequences that sample this step."""

from dataclasses import dataclass
from itertools import chain
from typing import Protocol

import numpy as np
import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.cuda_graph import DecodeGraphs
from engine.input_batch import BlockTables
from engine.scheduler_output import ScheduledSeq
from engine.sequence import Sequence


@dataclass(slots=True)
class PromptLogits:
    """The logits a prompt chunk yields for the prompt tokens it predicts (those from
    index `first`), for a request that asked for prompt logprobs."""

    entry: ScheduledSeq
    first: int
    logits: torch.Tensor


@dataclass(slots=True)
class StepArrays:
    """What a rank needs to run a step, in host arrays: the driver builds it, and under
    tensor parallelism sends it to the other ranks as it is."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    max_query_len: int
    num_decodes: int
    seq_lens_cpu: list[int]
    query_lens_cpu: list[int]
    logits_indices: np.ndarray | None  # the rows that sample; None: every row does
    prompt_rows: list[int]             # the rows whose logits give prompt logprobs


@dataclass(slots=True)
class ModelInput:
    arrays: StepArrays
    sampled: list[ScheduledSeq]      # the entries whose last token yields logits, in row order
    # Requests asking for prompt logprobs: (entry, first predicted index, count); the
    # rows of the tokens that predict them are the arrays' prompt_rows.
    prompt_chunks: list[tuple[ScheduledSeq, int, int]]


StepLogits = tuple[torch.Tensor, list[ScheduledSeq], list[PromptLogits]]


class StepPeers(Protocol):
    """The other ranks of a tensor-parallel engine, told of each step before it runs."""

    def send_step(self, arrays: StepArrays) -> None: ...


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, block_size: int,
                 max_model_len: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.graphs: DecodeGraphs | None = None
        self.block_tables = BlockTables(-(-max_model_len // block_size))
        self.peers: StepPeers | None = None

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
            block_tables=self._tensor(np.array([t + [0] * (width - len(t)) for t in tables],
                                               dtype=np.int32)),
            seq_lens=self._tensor(np.array(seq_lens, dtype=np.int32)),
            query_start_loc=self._tensor(np.array(starts, dtype=np.int32)),
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

    def sync_block_tables(self, changed: dict[int, Sequence]) -> None:
        """Take in the block tables the scheduler changed; once per step, before `execute`."""
        self.block_tables.apply_changes(changed)

    def prepare(self, scheduled: list[ScheduledSeq]) -> ModelInput:
        # Decodes first, as AttentionMetadata promises: a backend may batch them in one call.
        decodes = [e for e in scheduled if e.num_tokens == 1]
        batch = decodes if len(decodes) == len(scheduled) else decodes + [
            e for e in scheduled if e.num_tokens != 1]
        seqs = [e.seq for e in batch]
        starts_list = [s.num_computed_tokens for s in seqs]
        rows = self.block_tables.rows(seqs)
        starts = np.array(starts_list, dtype=np.int64)
        if len(decodes) == len(batch):
            input_ids = [s.token_ids[i] for s, i in zip(seqs, starts_list, strict=True)]
            query_lens_list = [1] * len(batch)
            positions, token_rows = starts, rows
            query_lens = np.ones(len(batch), dtype=np.int64)
        else:
            query_lens_list = [e.num_tokens for e in batch]
            input_ids = list(chain.from_iterable(
                s.token_ids[i:i + n] for s, i, n in zip(seqs, starts_list, query_lens_list,
                                                        strict=True)))
            query_lens = np.array(query_lens_list, dtype=np.int64)
            first = np.cumsum(query_lens) - query_lens  # each sequence's first token
            token_rows = np.repeat(rows, query_lens)
            positions = np.arange(len(input_ids)) + np.repeat(starts - first, query_lens)
        seq_lens = starts + query_lens
        query_start = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start[1:])
        bs = self.block_size
        table = self.block_tables.array
        slots = table[token_rows, positions // bs] * bs + positions % bs
        done = seq_lens == np.array([s.num_tokens for s in seqs])
        sampled_rows = np.flatnonzero(done)
        max_seq_len = int(seq_lens.max())
        chunks, rows_of_prompts = self._prompt_rows(batch, starts_list, query_start)
        arrays = StepArrays(
            input_ids=np.array(input_ids, dtype=np.int64), positions=positions,
            slot_mapping=slots,
            block_tables=table[rows, :-(-max_seq_len // bs)].astype(np.int32),
            seq_lens=seq_lens.astype(np.int32), query_start_loc=query_start.astype(np.int32),
            max_query_len=max(query_lens_list), num_decodes=len(decodes),
            seq_lens_cpu=seq_lens.tolist(), query_lens_cpu=query_lens_list,
            logits_indices=(None if len(sampled_rows) == len(batch) == len(input_ids)
                            else query_start[1:][sampled_rows] - 1),
            prompt_rows=rows_of_prompts,
        )
        return ModelInput(arrays, [batch[i] for i in sampled_rows.tolist()], chunks)

    @staticmethod
    def _prompt_rows(batch: list[ScheduledSeq], starts: list[int], query_start: np.ndarray
                     ) -> tuple[list[tuple[ScheduledSeq, int, int]], list[int]]:
        """The chunks of prompts whose requests want prompt logprobs: position p predicts
        prompt token p + 1, for p up to the prompt's second to last token."""
        chunks: list[tuple[ScheduledSeq, int, int]] = []
        rows: list[int] = []
        for i, (entry, start) in enumerate(zip(batch, starts, strict=True)):
            stop = min(start + entry.num_tokens, entry.seq.prompt_len - 1)
            if stop <= start or getattr(entry.group.params, "prompt_logprobs", None) is None:
                continue
            chunks.append((entry, start + 1, stop - start))
            first_row = int(query_start[i])
            rows.extend(range(first_row, first_row + stop - start))
        return chunks, rows

    def _tensor(self, data: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(data)
        return t.to(self.device, non_blocking=True) if self.device.type != "cpu" else t

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> StepLogits:
        """The logits of the entries that sample (in row order) and, for the requests
        that asked, of their prompt tokens."""
        inp = self.prepare(scheduled)
        if self.peers is not None:
            self.peers.send_step(inp.arrays)
        logits, prompt_logits = self.compute(inp.arrays)
        prompt: list[PromptLogits] = []
        offset = 0
        for entry, first, count in inp.prompt_chunks:
            prompt.append(PromptLogits(entry, first, prompt_logits[offset:offset + count]))
            offset += count
        return logits, inp.sampled, prompt

    @torch.inference_mode()
    def compute(self, arrays: StepArrays) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the step on this rank: (the sampling rows' logits, the prompt rows'). Every
        rank of a tensor-parallel engine runs it on the same arrays, so that the
        collectives inside the model meet."""
        a = arrays
        meta = AttentionMetadata(
            slot_mapping=self._tensor(a.slot_mapping), block_tables=self._tensor(a.block_tables),
            seq_lens=self._tensor(a.seq_lens), query_start_loc=self._tensor(a.query_start_loc),
            max_query_len=a.max_query_len, max_seq_len=max(a.seq_lens_cpu),
            num_decodes=a.num_decodes, seq_lens_cpu=a.seq_lens_cpu,
            query_lens_cpu=a.query_lens_cpu,
        )
        hidden = self._forward(self._tensor(a.input_ids), self._tensor(a.positions), meta)
        empty = hidden.new_empty((0, 0))
        prompt = empty
        if a.prompt_rows:
            rows = torch.tensor(a.prompt_rows, device=hidden.device)
            prompt = self.model.compute_logits(hidden[rows])
        if a.logits_indices is None:  # every token samples (decodes), in order
            return self.model.compute_logits(hidden), prompt
        if not len(a.logits_indices):
            return empty, prompt
        return self.model.compute_logits(hidden[self._tensor(a.logits_indices)]), prompt

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        self.backend.prepare(meta)  # once per forward, before any layer attends
        if self.graphs is not None and self.graphs.can_run(len(meta.seq_lens_cpu),
                                                           meta.max_query_len):
            return self.graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)
