"""The engine process's side of tensor parallelism: it starts ranks 1..k-1, joins them
as rank 0, tells them each step's work, and takes them down with it.

Ranks are spawned, never forked (CUDA cannot start again in a forked child), and
meet through a file store in a private temporary folder.
"""

import contextlib
import logging
import multiprocessing as mp
import shutil
import tempfile
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.distributed import rank_process
from engine.model_runner import StepArrays

logger = logging.getLogger(__name__)

# A collective waits this long for a rank that is alive but silent; a dead rank
# breaks the collective at once.
COLLECTIVE_TIMEOUT_S = 600.0
CLOSE_TIMEOUT_S = 5.0


class RankFailure(RuntimeError):
    """A tensor-parallel rank failed or died: the engine cannot run another step."""


class RankGroup:
    def __init__(self, config: EngineConfig) -> None:
        size = config.tensor_parallel_size
        self._folder = Path(tempfile.mkdtemp(prefix="pagedq-tp-"))
        store = str(self._folder / "store")
        ctx = mp.get_context("spawn")
        threads = max(torch.get_num_threads() // size, 1)
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        self._closed = False
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=rank_process.run, name=f"pagedq-rank-{rank}", daemon=True,
                args=(config, rank, store, COLLECTIVE_TIMEOUT_S, threads,
                      mp.current_process().pid, theirs))
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        try:
            self.shard, self.device = rank_process.connect(
                config, 0, store, timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        except Exception as exc:
            raise self.failure(exc) from exc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def send_step(self, arrays: StepArrays) -> None:
        self._send(("step", arrays))

    def send_cache_ops(self, ops: list[tuple[str, object]]) -> None:
        self._send(("cache", ops))

    def _send(self, message: tuple) -> None:
        try:
            for conn in self._conns:
                conn.send(message)
        except OSError as exc:
            raise self.failure(exc) from exc

    def failure(self, exc: BaseException) -> RankFailure:
        """What broke, from the ranks' own reports where they sent one; the group is
        closed, so the engine it served is done."""
        reports = []
        for conn in self._conns:
            try:
                if conn.poll(CLOSE_TIMEOUT_S):
                    _, rank, text = conn.recv()
                    reports.append(f"rank {rank}: {text.strip().splitlines()[-1]}")
                    logger.error("tensor-parallel rank %d failed:\n%s", rank, text)
            except (EOFError, OSError, ValueError):
                continue
        self.close()
        cause = "; ".join(reports) or f"{type(exc).__name__}: {exc}"
        return RankFailure(f"a tensor-parallel rank failed, the engine is stopped ({cause})")

    def close(self) -> None:
        """Stop every rank: asked first, then terminated, then killed."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        for proc in self._procs:
            proc.join(CLOSE_TIMEOUT_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(CLOSE_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._folder, ignore_errors=True)
