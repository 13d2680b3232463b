"""A tensor-parallel rank other than 0: a process that builds its shard of the model and
then runs what the engine's process sends it, step by step, until told to stop.

It never schedules or samples: the engine's process (rank 0) does, and sends each
step's arrays and KV-block moves down a pipe. A rank that fails reports why on that
pipe and exits, which breaks the others' collectives at once; a rank whose engine
process has died exits too, so no rank outlives its engine.
"""

import contextlib
import logging
import os
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from engine.cache_engine import CacheEngine
from engine.config import EngineConfig
from engine.distributed.shard import Shard
from engine.model_loader import load_config, resolve_max_model_len, resolve_model_path
from engine.model_runner import ModelRunner
from engine.rank import build_rank

logger = logging.getLogger(__name__)

PARENT_POLL_S = 0.5


def connect(config: EngineConfig, rank: int, store_path: str,
            timeout: timedelta) -> tuple[Shard, torch.device]:
    """Join the ranks' process group (NCCL on CUDA, gloo on the CPU): every rank calls
    this, rank 0 in the engine's process."""
    size = config.tensor_parallel_size
    store = dist.FileStore(store_path, size)
    if _on_cuda(config):
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        group = dist.ProcessGroupNCCL(store, rank, size)
    else:
        device = torch.device("cpu")
        group = dist.ProcessGroupGloo(store, rank, size, timeout)
    return Shard(rank, size, group, device), device


def _on_cuda(config: EngineConfig) -> bool:
    if config.device == "auto":
        return torch.cuda.is_available()
    return config.device.startswith("cuda")


def run(config: EngineConfig, rank: int, store_path: str, timeout_s: float,
        threads: int, parent_pid: int, conn: Connection) -> None:
    """The rank's life: join, build, serve; any failure is reported, then the exit."""
    _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    try:
        shard, device = connect(config, rank, store_path, timedelta(seconds=timeout_s))
        path = resolve_model_path(config.model)
        hf_config = load_config(path)
        max_len = resolve_max_model_len(hf_config, config.max_model_len)
        model = build_rank(config, path, hf_config, max_len, shard, device)
        _serve(model.runner, model.cache, conn)
    except (EOFError, BrokenPipeError):
        pass  # the engine's process is gone: nothing to report to
    except BaseException:  # noqa: BLE001 (report everything, then leave)
        with contextlib.suppress(OSError):
            conn.send(("error", rank, traceback.format_exc()))
        os._exit(1)


def _serve(runner: ModelRunner, cache: CacheEngine, conn: Connection) -> None:
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "step":
            runner.compute(message[1])
        elif kind == "cache":
            for op, arg in message[1]:
                getattr(cache, op)(arg)
        elif kind == "close":
            return
        else:
            raise ValueError(f"unknown message {kind!r} from the engine")


def _exit_with_parent(parent_pid: int) -> None:
    """A rank blocked in a collective never reads its pipe: a watcher thread ends the
    process once its engine's process is gone (the rank is re-parented)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="pagedq-rank-watch", daemon=True).start()
