"""One rank's share of the engine: its model (the whole model, or a tensor-parallel
shard of it), the runner and the KV pools.

The engine's process builds rank 0; a tensor-parallel engine's other ranks build
theirs with the same function in their own processes, so the collectives inside
(pool sizing, profiling, graph capture) meet in the same order.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from engine.attention_factory import make_backend
from engine.cache_engine import CacheEngine
from engine.config import CPU_KV_CACHE_GIB, EngineConfig
from engine.distributed.shard import Shard
from engine.model_loader import load_model, weight_bytes
from engine.model_runner import ModelRunner
from engine.platform import resolve_dtype, resolve_kv_dtype

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RankModel:
    runner: ModelRunner
    cache: CacheEngine
    num_device_blocks: int
    num_cpu_blocks: int
    weight_bytes: int
    sized_from_memory: bool  # False: num_device_blocks was forced by the config


def build_rank(config: EngineConfig, model_path: Path, hf_config: PretrainedConfig,
               max_model_len: int, shard: Shard, device: torch.device) -> RankModel:
    dtype = resolve_dtype(config, device)
    kv_dtype = resolve_kv_dtype(config, dtype)
    backend = make_backend(config.attention_backend, device, config.block_size)
    model = load_model(model_path, hf_config, max_model_len, backend, dtype, device,
                       config.quantization, shard)
    runner = ModelRunner(model, backend, config.block_size, max_model_len, device)
    num_layers = hf_config.num_hidden_layers
    block_bytes = CacheEngine.block_bytes(num_layers, model.num_kv_heads, model.head_dim,
                                          config.block_size, kv_dtype)
    sized = config.num_device_blocks is None
    num_device_blocks = (_size_device_pool(runner, config, max_model_len, block_bytes,
                                           model.num_kv_heads, kv_dtype, device)
                         if sized else config.num_device_blocks)
    # Ranks may hold different numbers of KV heads: the smallest pool decides.
    num_device_blocks = shard.min_over_ranks(num_device_blocks)
    num_cpu_blocks = shard.min_over_ranks(int(config.swap_space_gib * 2**30 // block_bytes))
    cache = CacheEngine(num_layers, model.num_kv_heads, model.head_dim, config.block_size,
                        num_device_blocks, num_cpu_blocks, kv_dtype, device, backend)
    model.bind_kv_cache(cache.device_cache)
    if device.type == "cuda" and backend.supports_cuda_graphs and not config.enforce_eager:
        _capture_graphs(runner, config, max_model_len, hf_config.hidden_size, dtype, shard)
    return RankModel(runner, cache, num_device_blocks, num_cpu_blocks, weight_bytes(model),
                     sized)


def _size_device_pool(runner: ModelRunner, config: EngineConfig, max_model_len: int,
                      block_bytes: int, num_kv_heads: int, kv_dtype: torch.dtype,
                      device: torch.device) -> int:
    """CPU: a fixed budget. CUDA: what a maximal step leaves of gpu_memory_utilization."""
    if device.type != "cuda":
        return max(int(CPU_KV_CACHE_GIB * 2**30 // block_bytes), 1)
    peak = runner.profile_peak_memory(config.max_num_batched_tokens, max_model_len,
                                      config.max_num_seqs, num_kv_heads, kv_dtype)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = total * config.gpu_memory_utilization - peak
    logger.info("GPU memory on %s: %.1f GiB total, %.2f GiB peak for a maximal step, "
                "%.1f GiB for the KV pool", device, total / 2**30, peak / 2**30,
                max(budget, 0) / 2**30)
    return max(int(budget // block_bytes), 0)


def _capture_graphs(runner: ModelRunner, config: EngineConfig, max_model_len: int,
                    hidden_size: int, dtype: torch.dtype, shard: Shard) -> None:
    """Graphs are an optimisation: serve eagerly where capture fails, on every rank
    alike (a rank replaying a graph meets the others' eager collectives just the same,
    but a rank without graphs must not wait for captures that never come)."""
    try:
        runner.capture_graphs(config.max_num_seqs, max_model_len, hidden_size, dtype)
    except RuntimeError as exc:
        logger.warning("CUDA graph capture failed, running eager: %s", exc)
        runner.graphs = None
    if not shard.min_over_ranks(int(runner.graphs is not None)):
        runner.graphs = None
