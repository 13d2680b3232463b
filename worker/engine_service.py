"""One engine, one loop thread, many waiting job threads.

The engine is not thread-safe, so a single loop thread alone calls
add_request, abort_request and step. Task threads hand it commands through a
queue and block on a Future; because every running task has its request in
the same engine, they are all decoded together in each step (continuous
batching across Celery tasks). A streaming request reports what is new after
every step (RequestOutputKind.DELTA): the loop hands that to the StreamWriter and
keeps the whole output for the job's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from worker.streams import StreamWriter

if TYPE_CHECKING:
    from engine import CompletionOutput, LLMEngine, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

CANCEL_REASON = "cancelled"
# How long a cancel for a job the engine does not hold (yet) is remembered:
# the cancel broadcast can overtake the task that is about to submit.
EARLY_CANCEL_TTL_S = 600.0
IDLE_WAKEUP_S = 1.0  # refreshes the live stats while there is nothing to step
RATE_WINDOW_S = 10.0
# An idle engine that just got work waits for the rest of a burst: while job
# threads are still claiming (see arriving()) or a request came in the last
# GATHER_GAP_S, for GATHER_MAX_S at most. A lone job starts GATHER_GAP_S later.
GATHER_GAP_S = 0.005
GATHER_MAX_S = 0.5


class EngineFailure(RuntimeError):
    """The engine raised inside step(); the requests in it were lost."""


class JobCancelled(Exception):
    """The job was cancelled before its request reached the engine."""


@dataclass(slots=True)
class Generation:
    output: RequestOutput
    cancelled: bool  # aborted because the job was cancelled (not by a deadline)


@dataclass(slots=True)
class _Add:
    request_id: str
    job_id: str
    attempt: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    deadline: float | None
    future: Future[Generation]
    stream: bool


@dataclass(slots=True)
class _Cancel:
    job_id: str
    request_id: str | None = None  # one attempt only; None: every attempt of the job


@dataclass(slots=True)
class _Live:
    job_id: str
    attempt: str
    future: Future[Generation]
    cancelled: bool = False
    # A streaming request's outputs so far, by index (its steps report only deltas).
    whole: dict[int, _Whole] | None = None


@dataclass(slots=True)
class _Whole:
    """One streaming completion's output, built up from its deltas in pieces (joined
    once at the end: appending to one long string would copy it every step)."""

    last: CompletionOutput  # its finish and logprob fields describe the whole so far
    texts: list[str] = field(default_factory=list)
    chars: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] | None = None

    def add(self, new: CompletionOutput) -> tuple[int, int]:
        """Append a delta; returns how many characters and tokens came before it."""
        start = (self.chars, len(self.token_ids))
        self.last = new
        self.texts.append(new.text)
        self.chars += len(new.text)
        self.token_ids += new.token_ids
        if new.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += new.logprobs
        return start

    def output(self) -> CompletionOutput:
        return replace(self.last, text="".join(self.texts), token_ids=self.token_ids,
                       logprobs=self.logprobs)


@dataclass(slots=True)
class _Rate:
    """Generated tokens per second over a sliding window."""

    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def update(self, now: float, total: int) -> float:
        self.samples.append((now, total))
        while self.samples and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        first_time, first_total = self.samples[0]
        return (total - first_total) / (now - first_time) if now > first_time else 0.0


class EngineService:
    def __init__(self, build: Callable[[], LLMEngine],
                 on_death: Callable[[], None] | None = None,
                 streams: StreamWriter | None = None) -> None:
        """`on_death` is called from the loop thread if the loop dies, after every
        job in it has been failed: a worker without an engine should exit. `streams`
        takes the new outputs of the requests submitted with `stream`."""
        self._build = build
        self._on_death = on_death
        self._streams = streams
        self._commands: queue.SimpleQueue[_Add | _Cancel | None] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # request id -> its job and future
        self._early_cancels: dict[str, float] = {}  # job id -> when the cancel came
        self._ready = threading.Event()
        self._stopping = False  # seen by the loop thread
        self._closed = False  # seen by callers
        self._closing = threading.Lock()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pagedq-engine", daemon=True)
        self._engine: LLMEngine | None = None
        self._rate = _Rate()
        self._arriving = 0  # job threads between taking a job and submitting it
        self._arriving_lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._beat = time.monotonic()  # when the loop last went round
        self.tokenizer: Any = None

    # -- called from any thread -------------------------------------------

    def start(self) -> None:
        """Build the engine on the loop thread and wait until it is ready."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout: float) -> None:
        """Finish the requests already in the engine (for up to `timeout`), then stop."""
        with self._closing:
            self._closed = True
            self._commands.put(None)
        self._thread.join(timeout)

    def alive(self, within_s: float) -> bool:
        """The loop runs and went round in the last `within_s` seconds."""
        return (self._thread.is_alive() and not self._closed
                and time.monotonic() - self._beat < within_s)

    def submit(self, job_id: str, attempt: str | int, prompt: str | list[int],
               params: SamplingParams, priority: int = 0,
               deadline: float | None = None, stream: bool = False) -> Future[Generation]:
        """Queue one attempt at a job; `attempt` tells it from other attempts.
        `stream` (with params.output_kind DELTA): each step's new outputs go to the
        StreamWriter; the Generation still holds the whole output."""
        future: Future[Generation] = Future()
        # Under the lock no submission can slip in behind stop()'s sentinel,
        # where the finished loop would never answer it.
        with self._closing:
            if self._closed:
                future.set_exception(EngineFailure("the worker is shutting down"))
            else:
                self._commands.put(_Add(f"{job_id}#{attempt}", job_id, str(attempt), prompt,
                                        params, priority, deadline, future, stream))
        return future

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap the work between taking a job and submitting it, so that an idle
        engine waits for a burst of jobs instead of starting on the first one."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def cancel(self, job_id: str) -> None:
        self._commands.put(_Cancel(job_id))

    def abort_attempt(self, job_id: str, attempt: str | int) -> None:
        """Abort one attempt (its job was taken over elsewhere), not the job's others."""
        self._commands.put(_Cancel(job_id, f"{job_id}#{attempt}"))

    def stats(self) -> dict[str, Any]:
        """The engine's live state as of its last step (safe to read from any thread)."""
        return self._snapshot

    # -- the loop thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            self._engine = self._build()
            self.tokenizer = self._engine.get_tokenizer()
            self._refresh_stats()
        except BaseException as exc:  # reported to start()'s caller
            self._startup_error = exc
            return
        finally:
            self._ready.set()
        try:
            while not (self._stopping and not self._live):
                self._beat = time.monotonic()
                idle = not self._engine.has_unfinished_requests()
                self._drain(block=idle)
                if idle and self._engine.has_unfinished_requests():
                    self._gather()
                if self._engine.has_unfinished_requests():
                    self._step()
        except BaseException as exc:
            log.exception("the engine loop died")
            self._close_down(EngineFailure(f"the engine loop died: {exc!r}"))
            if self._on_death is not None:
                self._on_death()
        finally:
            self._engine.shutdown()

    def _drain(self, block: bool) -> None:
        """Apply every waiting command, first waiting a while for one if `block`."""
        try:
            command = self._commands.get(timeout=IDLE_WAKEUP_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            if block:
                self._refresh_stats()
            return
        while True:
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _gather(self) -> None:
        """Jobs reach the loop one by one, as their Celery tasks start; when a burst
        wakes an idle engine, let it arrive before the first step, so that it is
        prefilled in one batch rather than trickling in over many steps."""
        until = time.monotonic() + GATHER_MAX_S
        while time.monotonic() < until:
            try:
                self._handle(self._commands.get(timeout=GATHER_GAP_S))
            except queue.Empty:
                if not self._arriving:
                    return

    def _handle(self, command: _Add | _Cancel | None) -> None:
        if command is None:
            self._stopping = True
        else:
            self._apply(command)

    def _apply(self, command: _Add | _Cancel) -> None:
        assert self._engine is not None
        if isinstance(command, _Cancel):
            self._cancel(command)
            return
        if command.job_id in self._early_cancels:
            command.future.set_exception(JobCancelled(command.job_id))
            return
        try:
            self._engine.add_request(command.request_id, command.prompt, command.params,
                                     priority=command.priority, deadline=command.deadline)
        except Exception as exc:  # bad input is a ValueError; the job decides what else means
            command.future.set_exception(exc)
            return
        streamed = command.stream and self._streams is not None
        self._live[command.request_id] = _Live(command.job_id, command.attempt, command.future,
                                               whole={} if streamed else None)

    def _cancel(self, command: _Cancel) -> None:
        assert self._engine is not None
        job_id = command.job_id
        found = False
        for request_id, live in self._live.items():
            if live.job_id == job_id and command.request_id in (None, request_id):
                live.cancelled = found = True
                self._engine.abort_request(request_id, CANCEL_REASON)
        if not found and command.request_id is None:
            now = time.monotonic()
            self._early_cancels = {job: at for job, at in self._early_cancels.items()
                                   if now - at < EARLY_CANCEL_TTL_S}
            self._early_cancels[job_id] = now

    def _step(self) -> None:
        assert self._engine is not None
        try:
            outputs = self._engine.step()
        except Exception as exc:
            log.exception("engine step failed; rebuilding the engine")
            self._fail_all(EngineFailure(f"engine step failed: {exc!r}"))
            self._engine.shutdown()  # its tensor-parallel ranks, before new ones start
            self._engine = self._build()
            return
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is not None and live.whole is not None:
                output = self._stream(live, output)
            if output.finished:
                live = self._live.pop(output.request_id)
                live.future.set_result(Generation(output, live.cancelled))
        self._refresh_stats()

    def _stream(self, live: _Live, output: RequestOutput) -> RequestOutput:
        """Hand a streaming request's new outputs to the writer; returns, once it has
        finished, its whole output as a non-streaming request would have it."""
        assert self._streams is not None and live.whole is not None
        starts = [live.whole.setdefault(new.index, _Whole(new)).add(new)
                  for new in output.outputs]
        self._streams.delta(live.job_id, live.attempt, output.outputs, starts)
        if not output.finished:
            return output
        outputs = [live.whole[index].output() for index in sorted(live.whole)]
        output.metrics.num_generated_tokens = sum(len(o.token_ids) for o in outputs)
        return replace(output, outputs=outputs)

    def _fail_all(self, error: Exception) -> None:
        for live in self._live.values():
            live.future.set_exception(error)
        self._live.clear()

    def _close_down(self, error: Exception) -> None:
        """No loop will answer anymore: fail what is in flight and what is queued."""
        with self._closing:
            self._closed = True
        self._fail_all(error)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.future.set_exception(error)

    def _refresh_stats(self) -> None:
        assert self._engine is not None
        s = self._engine.stats()
        used = s.device_blocks_total - s.device_blocks_free
        self._snapshot = {
            "running": s.num_running,
            "waiting": s.num_waiting,
            "swapped": s.num_swapped,
            "jobs_in_engine": len(self._live),
            "kv_blocks_used": used,
            "kv_blocks_total": s.device_blocks_total,
            "kv_usage": round(used / s.device_blocks_total, 4) if s.device_blocks_total else 0.0,
            "swap_blocks_used": s.swap_blocks_total - s.swap_blocks_free,
            "swap_blocks_total": s.swap_blocks_total,
            "tokens_per_s": round(self._rate.update(time.monotonic(), s.num_generated_tokens), 2),
            "prompt_tokens": s.num_prompt_tokens,
            "generated_tokens": s.num_generated_tokens,
            "preemptions": s.num_preemptions,
            "swapped_out_blocks": s.num_swapped_out_blocks,
            "swapped_in_blocks": s.num_swapped_in_blocks,
            "prefix_cache_hit_rate": round(s.prefix_cache_hit_rate, 4),
            "peak_running": s.peak_num_running,
            "steps": s.num_steps,
        }
