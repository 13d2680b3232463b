"""LLMEngine: requests in, one scheduled model step at a time, RequestOutputs out.

Not thread-safe: one thread drives add_request / abort_request / step.
"""

import gc
import logging
import time
import weakref
from typing import Any

import torch

from engine import detokenizer
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.distributed.ranks import RankGroup
from engine.distributed.shard import ONE_RANK
from engine.model_loader import (
    load_config,
    load_eos_token_ids,
    load_tokenizer,
    resolve_max_model_len,
    resolve_model_path,
)
from engine.model_runner import PromptLogits, StepLogits
from engine.outputs import EngineStats, RequestOutput, completions, decode_tokens
from engine.platform import resolve_device
from engine.rank import build_rank
from engine.request_checks import Params, Prompt, RequestChecker
from engine.sampler import Sampler, prompt_logprobs
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import SamplePlan, ScheduledSeq, StepResult
from engine.seq_factory import SequenceFactory
from engine.sequence import SequenceGroup, SequenceStatus
from engine.step_isolation import (
    bisect_failures,
    compute_tokens,
    concat_parts,
    entries_of,
    groups_in_order,
    lost_blocks,
    merge,
    plan_samples,
)
from engine.stop_checker import StopChecker
from engine.structured_output import Grammar, StructuredOutputManager

logger = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.05
NewRequest = tuple[str, Prompt, Params | None, int]  # request_id, prompt, params, priority


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.hf_config = load_config(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.max_model_len = resolve_max_model_len(self.hf_config, config.max_model_len)
        self.ranks = RankGroup(config) if config.tensor_parallel_size > 1 else None
        if self.ranks is not None:
            # An engine dropped without shutdown() still takes its ranks down.
            weakref.finalize(self, self.ranks.close)
        try:
            shard, device = ((self.ranks.shard, self.ranks.device) if self.ranks
                             else (ONE_RANK, resolve_device(config)))
            rank = build_rank(config, self.model_path, self.hf_config, self.max_model_len,
                              shard, device)
            if rank.sized_from_memory:
                # A pool sized from memory must hold one whole sequence; a forced size is
                # the caller's choice, and requests that outgrow it are aborted one by one.
                self._check_pool(rank.num_device_blocks)
        except Exception as exc:
            if self.ranks is None:
                raise
            failure = self.ranks.failure(exc)
            if isinstance(exc, ValueError):  # a setting every rank refuses alike
                raise
            raise failure from exc
        self.device = device
        self.runner, self.cache = rank.runner, rank.cache
        self.runner.peers = self.ranks
        self.weight_bytes = rank.weight_bytes
        num_device_blocks, num_cpu_blocks = rank.num_device_blocks, rank.num_cpu_blocks
        model, hc = self.runner.model, self.hf_config
        self.eos_token_ids = load_eos_token_ids(self.model_path, self.hf_config,
                                                self.tokenizer)
        self.sampler = Sampler(self.eos_token_ids)
        self.seq_factory = SequenceFactory(device, self.tokenizer, self.eos_token_ids,
                                           config.seed)
        self.scheduler = Scheduler(
            config, num_device_blocks, num_cpu_blocks, self.seq_factory,
            StopChecker(self.eos_token_ids, self.max_model_len, self.tokenizer),
            window=model.shared_window)
        self.structured = StructuredOutputManager(self.tokenizer, hc.vocab_size,
                                                  self.eos_token_ids, self.model_path)
        self.checker = RequestChecker(config, self.model_path, hc.vocab_size,
                                      self.max_model_len, self.tokenizer, self.block_manager)
        self.requests: dict[str, SequenceGroup] = {}
        self._num_deadlines = 0  # requests with a deadline: none, no clock to check
        self._aborted: list[SequenceGroup] = []
        self._counters = {"peak_num_running": 0, "peak_device_blocks_used": 0,
                          "num_steps": 0}
        # The start-up leaves a few hundred thousand long-lived objects (tokenizer, model,
        # pools): keep the collector from walking them again and again while serving.
        gc.collect()
        gc.freeze()

    # ---- set-up -------------------------------------------------------------

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

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any; the engine runs no step after this."""
        if self.ranks is not None:
            self.ranks.close()

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def block_manager(self) -> BlockManager:
        """The scheduler's block manager (read it; the scheduler changes it)."""
        return self.scheduler.bm

    # ---- requests -------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: Params | None = None,
                    priority: int = 0, deadline: float | None = None) -> None:
        """Queue a request. Bad input raises ValueError naming the field; the engine is
        then unchanged."""
        params = params or SamplingParams()
        self._check_id(request_id)
        token_ids = self.checker.check(prompt, params, priority, deadline)
        grammar = self._grammar(params)
        self._enqueue(self.seq_factory.new_group(request_id, prompt, token_ids, params,
                                                 priority, deadline, grammar))

    def add_requests(self, requests: list[NewRequest]) -> None:
        """Queue (request_id, prompt, params, priority) requests: all of them, or, when
        one is invalid, none (ValueError naming the field)."""
        requests = [(rid, prompt, params or SamplingParams(), priority)
                    for rid, prompt, params, priority in requests]
        seen: set[str] = set()
        for request_id, *_ in requests:
            self._check_id(request_id)
            if request_id in seen:
                raise ValueError(f"request_id {request_id!r} appears twice")
            seen.add(request_id)
        checked = [self.checker.check(prompt, params, priority, None)
                   for _, prompt, params, priority in requests]
        grammars = [self._grammar(params) for _, _, params, _ in requests]
        groups = [self.seq_factory.new_group(rid, prompt, ids, params, priority, None, grammar)
                  for (rid, prompt, params, priority), ids, grammar
                  in zip(requests, checked, grammars, strict=True)]
        for group in groups:
            self._enqueue(group)

    def _grammar(self, params: Params) -> Grammar | None:
        """The request's grammar, compiling in the background (an invalid spec is a
        ValueError naming the field, raised here)."""
        spec = getattr(params, "structured_outputs", None)
        return None if spec is None else self.structured.prepare(spec)

    def _check_id(self, request_id: str) -> None:
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")

    def _enqueue(self, group: SequenceGroup) -> None:
        self.requests[group.request_id] = group
        self._num_deadlines += group.deadline is not None
        self.scheduler.add(group)

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
        if self._num_deadlines:
            self._expire_deadlines()
        sched = self.scheduler.schedule()
        for group in sched.never_fit:
            self.abort_request(group.request_id, group.abort_reason)
        # Forks made while sampling the last step, before anything can move their blocks.
        self._move_blocks([("copy", sched.fork_copies), ("swap_out", sched.blocks_to_swap_out),
                           ("swap_in", sched.blocks_to_swap_in),
                           ("copy", sched.blocks_to_copy)])
        self.runner.sync_block_tables(sched.changed_tables)
        c, bm = self._counters, self.block_manager
        # An upper bound first: counting live sequences exactly is rarely needed.
        if sum(len(g.seqs) for g in self.scheduler.running) > c["peak_num_running"]:
            c["peak_num_running"] = max(c["peak_num_running"],
                                        self.scheduler.num_running_seqs())
        c["peak_device_blocks_used"] = max(c["peak_device_blocks_used"],
                                           bm.device.num_blocks - bm.device.num_free)
        updated: list[SequenceGroup] = []
        if sched.scheduled:
            updated = self._run(sched.scheduled)
            c["num_steps"] += 1
        elif sched.compiling:
            # Nothing else can run: wait a little for a grammar rather than spin.
            sched.compiling[0].grammar.wait(GRAMMAR_WAIT_S)
        elif not (sched.preempted or self._aborted) and self.scheduler.has_unfinished():
            self._abort_stuck()
        outputs = [out for g in updated if (out := self._report(g)) is not None]
        for group in self._aborted:
            outputs.append(self._report(group))
        self._aborted.clear()
        return outputs

    def _move_blocks(self, ops: list[tuple[str, Any]]) -> None:
        """Copies and swaps in the KV pools, on every rank."""
        ops = [(op, arg) for op, arg in ops if arg]
        if not ops:
            return
        try:
            if self.ranks is not None:
                self.ranks.send_cache_ops(ops)
            for op, arg in ops:
                getattr(self.cache, op)(arg)
        except Exception as exc:
            if self.ranks is None:
                raise
            raise self.ranks.failure(exc) from exc

    def _expire_deadlines(self) -> None:
        now = time.time()
        for group in list(self.requests.values()):
            if group.deadline is not None and now > group.deadline:
                self.abort_request(group.request_id, "deadline exceeded")

    def _abort_stuck(self) -> None:
        """Nothing ran, moved or ended this step, so no later step would differ: abort the
        request at the head of the line rather than spin on it."""
        group = self.scheduler.first_in_line()
        cfg = self.config
        self.abort_request(group.request_id, (
            f"the scheduler cannot fit this request into a step (max_num_seqs "
            f"{cfg.max_num_seqs}, max_num_batched_tokens {cfg.max_num_batched_tokens}, "
            f"{self.block_manager.device.num_blocks} device blocks)"))

    def _run(self, scheduled: list[ScheduledSeq]) -> list[SequenceGroup]:
        """Run the model, compute the next tokens, apply them; return the requests that
        got tokens. A request whose forward or sampling raises is aborted alone; the
        others get the tokens they would get without it."""
        try:
            logits, sampled, prompt = self.runner.execute(scheduled)
        except Exception as exc:
            if self.ranks is not None:
                # The other ranks are in a collective, or gone: no step can be retried.
                raise self.ranks.failure(exc) from exc
            logits, sampled, prompt = self._execute_isolated(scheduled, exc)
        for chunk in prompt:
            try:
                self._add_prompt_logprobs(chunk)
            except Exception as exc:
                self._abort_failed(chunk.entry.group, exc)
        self.scheduler.advance(scheduled)
        plans, failed = plan_samples(sampled, self.scheduler)
        for group, exc in failed:
            self._abort_failed(group, exc)
        try:
            results = compute_tokens(plans, logits, self.sampler, self.max_model_len)
        except Exception as exc:
            results = self._compute_isolated(plans, logits, exc)
        updated, failed = self.scheduler.update_from_output(plans, results, time.time())
        for group, exc in failed:
            self._abort_failed(group, exc)
        return updated

    def _add_prompt_logprobs(self, chunk: PromptLogits) -> None:
        """Record the prompt logprobs a chunk yields; positions already recorded (a prompt
        recomputed after a preemption) are kept as they are."""
        group, seq = chunk.entry.group, chunk.entry.seq
        if seq.status is not SequenceStatus.RUNNING:  # aborted or restarted this step
            return
        recorded = group.prompt_logprobs if group.prompt_logprobs is not None else [None]
        tokens = seq.token_ids[chunk.first:chunk.first + len(chunk.logits)]
        for position, logprobs in enumerate(
                prompt_logprobs(chunk.logits, tokens, group.params.prompt_logprobs),
                chunk.first):
            if position == len(recorded):
                recorded.append(logprobs)
        group.prompt_logprobs = recorded

    def _execute_isolated(self, scheduled: list[ScheduledSeq], error: Exception
                          ) -> StepLogits:
        """The forward raised: abort the groups that fail alone, and start afresh those
        that reused blocks a failed group was to write (their KV is wrong)."""
        groups = groups_in_order(scheduled)
        parts, failed = bisect_failures(
            groups, lambda part: self.runner.execute(entries_of(scheduled, part)), error)
        if len(groups) > 1 and len(failed) == len(groups):
            # Every request fails on its own: the model or the device is broken, not a
            # request. The caller decides (the worker rebuilds and retries uncharged).
            raise error
        lost, readers = lost_blocks(scheduled, [g for g, _ in failed],
                                    self.config.block_size)
        self.scheduler.drop_unwritten(lost, readers)
        for group, exc in failed:
            self._abort_failed(group, exc)
        return concat_parts(parts)

    def _compute_isolated(self, plans: list[SamplePlan], logits: torch.Tensor,
                          error: Exception) -> dict[str, StepResult]:
        parts, failed = bisect_failures(
            plans, lambda part: compute_tokens(part, logits, self.sampler, self.max_model_len),
            error)
        for plan, exc in failed:
            self._abort_failed(plan.group, exc)
        return merge(parts)

    def _abort_failed(self, group: SequenceGroup, exc: Exception) -> None:
        logger.error("request %s failed in a step and is aborted", group.request_id,
                     exc_info=exc)
        self.abort_request(group.request_id, f"engine error: {exc!r}")

    # ---- outputs --------------------------------------------------------------

    def _report(self, group: SequenceGroup) -> RequestOutput | None:
        """The request's output this step; None while a FINAL_ONLY request runs."""
        finished = group.is_finished
        if not finished and (getattr(group.params, "output_kind", None)
                             is RequestOutputKind.FINAL_ONLY):
            return None
        outputs = completions(group, self._decode)
        m = group.metrics
        m.num_generated_tokens = sum(len(o.token_ids) for o in outputs)
        if finished:
            m.finished_time = time.time()
            self.scheduler.remove(group)
            self.requests.pop(group.request_id, None)
            self._num_deadlines -= group.deadline is not None
        prompt = None
        if getattr(group.params, "prompt_logprobs", None) is not None:
            prompt = group.prompt_logprobs or [None]
            decode_tokens(prompt, self._decode)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs,
                             finished, m, group.abort_reason, prompt)

    def _decode(self, prompt_token_ids: list[int], output_token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return detokenizer.decode_output(self.tokenizer, prompt_token_ids, output_token_ids)

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
            num_prompt_tokens=sched.num_prompt_tokens,
            num_generated_tokens=sched.num_generated_tokens,
            weight_bytes=self.weight_bytes,
            **self._counters,
        )
