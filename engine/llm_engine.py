"""LLMEngine: requests in, one scheduled model step at a time, RequestOutputs out.

Not thread-safe: one thread drives add_request / abort_request / step.
"""

import itertools
import logging
import random
import time

import torch

from engine import detokenizer
from engine.beam_search import BeamState
from engine.block_manager import BlockManager
from engine.cache_engine import CacheEngine
from engine.config import CPU_KV_CACHE_GIB, EngineConfig
from engine.model_loader import (
    load_config,
    load_eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_max_model_len,
    resolve_model_path,
)
from engine.model_runner import ModelRunner
from engine.outputs import EngineStats, RequestOutput, completions
from engine.sampler import Sampler
from engine.sampling_params import BeamSearchParams, SamplingParams
from engine.scheduler import ScheduledSeq, Scheduler
from engine.sequence import RequestMetrics, Sequence, SequenceGroup, SequenceStatus

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.hf_config = load_config(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.max_model_len = resolve_max_model_len(self.hf_config, config.max_model_len)
        device, dtype = config.torch_device, config.torch_dtype
        backend = config.resolved_attention_backend
        model = load_model(self.model_path, self.hf_config, self.max_model_len, backend, dtype,
                           device)
        self.runner = ModelRunner(model, config.block_size, device)
        hc = self.hf_config
        kv_heads, head_dim = hc.num_key_value_heads, model.head_dim
        block_bytes = CacheEngine.block_bytes(hc.num_hidden_layers, kv_heads, head_dim,
                                              config.block_size, dtype)
        num_device_blocks = config.num_device_blocks
        if num_device_blocks is None:
            # A pool sized from memory must hold one whole sequence; a forced size is
            # the caller's choice, and requests that outgrow it are aborted one by one.
            num_device_blocks = self._size_device_pool(block_bytes)
            self._check_pool(num_device_blocks)
        num_cpu_blocks = int(config.swap_space_gib * 2**30 // block_bytes)
        self.cache = CacheEngine(hc.num_hidden_layers, kv_heads, head_dim, config.block_size,
                                 num_device_blocks, num_cpu_blocks, dtype, device, backend)
        model.bind_kv_cache(self.cache.device_cache)
        if device.type == "cuda" and backend == "triton" and not config.enforce_eager:
            try:
                self.runner.capture_graphs(config.max_num_seqs, self.max_model_len,
                                           hc.hidden_size, dtype)
            except RuntimeError as exc:  # graphs are an optimisation: serve eagerly instead
                logger.warning("CUDA graph capture failed, running eager: %s", exc)
                self.runner.graphs = None
        self.block_manager = BlockManager(config.block_size, num_device_blocks, num_cpu_blocks,
                                          config.enable_prefix_caching, config.share_blocks)
        self.scheduler = Scheduler(config, self.block_manager)
        self.eos_token_ids = load_eos_token_ids(self.model_path, self.hf_config,
                                                self.tokenizer)
        self.sampler = Sampler(self.eos_token_ids)
        self.requests: dict[str, SequenceGroup] = {}
        self._aborted: list[SequenceGroup] = []
        self._fork_copies: list[tuple[int, int]] = []  # executed before the next forward
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._counters = {"num_prompt_tokens": 0, "num_generated_tokens": 0,
                          "peak_num_running": 0, "peak_device_blocks_used": 0,
                          "num_steps": 0}

    # ---- set-up -------------------------------------------------------------

    def _size_device_pool(self, block_bytes: int) -> int:
        """CPU: a fixed budget. CUDA: what a maximal step leaves of gpu_memory_utilization."""
        if self.config.torch_device.type != "cuda":
            return max(int(CPU_KV_CACHE_GIB * 2**30 // block_bytes), 1)
        cfg = self.config
        peak = self.runner.profile_peak_memory(
            cfg.max_num_batched_tokens, self.max_model_len, cfg.max_num_seqs,
            self.hf_config.num_key_value_heads, cfg.torch_dtype)
        total = torch.cuda.get_device_properties(cfg.torch_device).total_memory
        budget = total * cfg.gpu_memory_utilization - peak
        logger.info("GPU memory: %.1f GiB total, %.2f GiB peak for a maximal step, "
                    "%.1f GiB for the KV pool", total / 2**30, peak / 2**30,
                    max(budget, 0) / 2**30)
        return max(int(budget // block_bytes), 0)

    def _check_pool(self, num_blocks: int) -> None:
        """Fail fast when one sequence of max_model_len cannot fit (vLLM #2418)."""
        bs = self.config.block_size
        per_seq = -(-self.max_model_len // bs)
        if num_blocks < per_seq:
            raise ValueError(
                f"the KV pool holds {num_blocks} blocks ({num_blocks * bs} tokens) but one "
                f"sequence of max_model_len {self.max_model_len} needs {per_seq}: lower "
                "max_model_len, or raise gpu_memory_utilization / num_device_blocks"
            )
        logger.info("KV pool: %d blocks of %d tokens; max concurrency %.1f sequences of "
                    "max_model_len %d", num_blocks, bs, num_blocks / per_seq,
                    self.max_model_len)

    def get_tokenizer(self):
        return self.tokenizer

    # ---- requests -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt,
                    params: SamplingParams | BeamSearchParams | None = None,
                    priority: int = 0, deadline: float | None = None) -> None:
        """Queue a request. Bad input raises ValueError naming what is wrong."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is "
                             f"{self.max_model_len} (prompt plus at least one new token)")
        vocab = self.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
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
            self._check_beam_fits(token_ids, params)
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos
                                                  else self.eos_token_ids)
            group.beam = BeamState(params, stops)
        group.seqs.append(self._new_seq(group, 0))
        self.requests[request_id] = group
        self.scheduler.add(group)

    def _check_beam_fits(self, token_ids: list[int], params: BeamSearchParams) -> None:
        """Beams share the prompt's blocks; each needs its own blocks for what it generates."""
        bm = self.block_manager
        new_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        need = bm.blocks_for(len(token_ids)) + params.beam_width * (bm.blocks_for(new_tokens) + 1)
        if need > bm.device.num_blocks:
            raise ValueError(
                f"beam search with beam_width {params.beam_width} needs up to {need} KV blocks "
                f"but the device pool holds {bm.device.num_blocks}"
            )

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"checkpoint {self.model_path} has no tokenizer: "
                                 "pass the prompt as a list of token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a str or a list of int token ids")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _new_seq(self, group: SequenceGroup, index: int) -> Sequence:
        """Sequence `index` of a request; sample i of a seeded request draws with seed + i."""
        generator = None
        if isinstance(group.params, SamplingParams) and not group.params.greedy:
            generator = torch.Generator(self.config.torch_device)
            generator.manual_seed(group.seed + index)
        token_ids = group.prompt_token_ids
        seq = Sequence(next(self._seq_ids), list(token_ids), len(token_ids), generator, index)
        if self.tokenizer is not None:
            detokenizer.start(seq)
        return seq

    def abort_request(self, request_id: str, reason: str | None = None) -> None:
        """Stop a request; its final output (finish_reason "abort") comes with the next step."""
        group = self.requests.get(request_id)
        if group is None or group in self._aborted:
            return
        self.scheduler.remove(group)
        for seq in group.live_seqs():
            seq.status = SequenceStatus.FINISHED_ABORTED
        group.abort_reason = reason or "aborted by the caller"
        self._aborted.append(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step -------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        self._expire_deadlines()
        # Forks made while sampling the last step, before anything can move their blocks.
        self.cache.copy(self._fork_copies)
        self._fork_copies.clear()
        sched = self.scheduler.schedule()
        for group in sched.never_fit:
            self.abort_request(group.request_id, group.abort_reason)
        self.cache.swap_out(sched.blocks_to_swap_out)
        self.cache.swap_in(sched.blocks_to_swap_in)
        self.cache.copy(sched.blocks_to_copy)
        touched: dict[str, SequenceGroup] = {}
        c, bm = self._counters, self.block_manager
        c["peak_num_running"] = max(c["peak_num_running"], self.scheduler.num_running_seqs())
        c["peak_device_blocks_used"] = max(c["peak_device_blocks_used"],
                                           bm.device.num_blocks - bm.device.num_free)
        if sched.scheduled:
            logits, sampled = self.runner.execute(sched.scheduled)
            self._advance(sched.scheduled)
            self._sample(logits, sampled, touched)
            self._counters["num_steps"] += 1
        outputs = [self._finish_or_report(g) for g in touched.values()]
        for group in self._aborted:
            outputs.append(self._finish_or_report(group))
        self._aborted.clear()
        return outputs

    def _expire_deadlines(self) -> None:
        now = time.time()
        for group in list(self.requests.values()):
            if group.deadline is not None and now > group.deadline:
                self.abort_request(group.request_id, "deadline exceeded")

    def _advance(self, scheduled: list[ScheduledSeq]) -> None:
        for entry in scheduled:
            seq = entry.seq
            before = seq.num_computed_tokens
            seq.num_computed_tokens += entry.num_tokens
            self._counters["num_prompt_tokens"] += max(
                min(seq.num_computed_tokens, seq.prompt_len) - before, 0)

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledSeq],
                touched: dict[str, SequenceGroup]) -> None:
        rows: list[int] = []
        seqs: list[Sequence] = []
        params: list[SamplingParams] = []
        beam_rows: dict[str, dict[int, int]] = {}  # request -> seq_id -> logits row
        now = time.time()
        for row, entry in enumerate(sampled):
            group, seq = entry.group, entry.seq
            touched[group.request_id] = group
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
            if group.beam is not None:
                beam_rows.setdefault(group.request_id, {})[seq.seq_id] = row
                continue
            for s in self._fork_samples(group, seq):
                rows.append(row)
                seqs.append(s)
                params.append(group.params)
        for request_id, by_seq in beam_rows.items():
            # Rows come in the runner's order; beams are stepped in the group's order.
            group = touched[request_id]
            self._step_beams(group, logits[[by_seq[s.seq_id] for s in group.seqs]])
        if seqs:
            # Every row sampled once, in order (no forks, no beams): no copy needed.
            picked = logits if rows == list(range(len(logits))) else logits[rows]
            results = self.sampler(picked, seqs, params)
            for seq, p, res in zip(seqs, params, results, strict=True):
                self._append_token(seq, p, res.token_id, res.logprob, res.top_logprobs)

    def _fork_samples(self, group: SequenceGroup, seq: Sequence) -> list[Sequence]:
        """After the prompt, a request with n > 1 forks into n sequences sharing its blocks."""
        if group.params.n == 1 or len(group.seqs) > 1:
            return [seq]
        group.seqs.extend(self._fork(group, seq, i) for i in range(1, group.params.n))
        return group.seqs

    def _fork(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        """A running copy of `parent` that shares its blocks (copy-on-write)."""
        child = self._new_seq(group, index)
        child.token_ids = list(parent.token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.cumulative_logprob = parent.cumulative_logprob
        child.status = SequenceStatus.RUNNING
        self.block_manager.fork(parent, child, self._fork_copies)
        return child

    def _step_beams(self, group: SequenceGroup, logits: torch.Tensor) -> None:
        """Replace the group's beams by the next ones: reuse a parent for its first
        continuation, fork it for the others, free the parents nobody continues."""
        beams = group.seqs
        state = group.beam
        at_limit = (beams[0].num_output_tokens + 1 >= state.params.max_tokens
                    or beams[0].num_tokens + 1 >= self.max_model_len)
        nexts = state.step(logits, [b.cumulative_logprob for b in beams],
                           [b.output_token_ids for b in beams], at_limit)
        taken: set[int] = set()
        new_beams = []
        for i, cand in enumerate(nexts):
            parent = beams[cand.parent]
            beam = self._fork(group, parent, i) if cand.parent in taken else parent
            taken.add(cand.parent)
            new_beams.append(beam)
        for i, (beam, cand) in enumerate(zip(new_beams, nexts, strict=True)):
            beam.index = i
            beam.token_ids.append(cand.token_id)
            beam.cumulative_logprob = cand.cumulative_logprob
        for i, beam in enumerate(beams):
            if i not in taken:
                self.scheduler.free_seq(beam)
                beam.status = SequenceStatus.FINISHED_STOPPED
        group.seqs = new_beams
        self._counters["num_generated_tokens"] += len(new_beams)

    def _append_token(self, seq: Sequence, p: SamplingParams, token: int, logprob: float,
                      top: dict[int, float] | None) -> None:
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if p.logprobs is not None:
            seq.logprobs.append(top or {token: logprob})
        self._counters["num_generated_tokens"] += 1
        new_text = detokenizer.update(self.tokenizer, seq) if seq.detok else ""
        status, reason = self._check_stop(seq, p, token, new_text)
        if status is not None:
            self.scheduler.free_seq(seq)
            seq.status = status
            seq.stop_reason = reason

    def _check_stop(self, seq: Sequence, p: SamplingParams, token: int, new_text: str):
        stop = SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return stop, None
            if token in p.stop_token_ids:
                return stop, token
            if seq.detok is not None:
                matched = detokenizer.find_stop(seq, new_text, p.stop)
                if matched is not None:
                    return stop, matched
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH, None
        return None, None

    # ---- outputs --------------------------------------------------------------

    def _finish_or_report(self, group: SequenceGroup) -> RequestOutput:
        finished = group.is_finished
        outputs = completions(group, self._decode)
        m = group.metrics
        m.num_generated_tokens = sum(len(o.token_ids) for o in outputs)
        if finished:
            m.finished_time = time.time()
            self.scheduler.remove(group)
            self.requests.pop(group.request_id, None)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                             finished, m, group.abort_reason)

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            num_running=sched.num_running_seqs(),
            num_waiting=len(sched.waiting),
            num_swapped=len(sched.swapped),
            device_blocks_total=bm.device.num_blocks,
            device_blocks_free=bm.device.num_free,
            swap_blocks_total=bm.cpu.num_blocks,
            swap_blocks_free=bm.cpu.num_free,
            num_preemptions=sched.num_preemptions,
            num_swapped_out_blocks=sched.num_swapped_out_blocks,
            num_swapped_in_blocks=sched.num_swapped_in_blocks,
            num_cow_copies=bm.num_cow_copies,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            **self._counters,
        )
