"""Launch planning of the paged-attention kernel, on the host: the mode (decode-like or
prefill), the query-block size, the number of programs and of flash-decoding splits."""

import functools
import math
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Shape:
    """Launch shape of one mode: query rows per program, key tile, warps, pipeline depth."""

    rows: int
    tile_elements: int  # keys per tile x padded head_dim
    num_warps: int
    num_stages: int

    def tile_n(self, block_d: int) -> int:
        return max(16, self.tile_elements // block_d)


# Decode packs a token's query-head group into the 16 rows tl.dot needs at least
# and streams 16 KB of bf16 keys (and as much of values) per step: on an H200 that
# read 70-100% of copy bandwidth. Prefill takes more tokens per program so that
# each key tile serves many of them.
DECODE = Shape(rows=16, tile_elements=8192, num_warps=4, num_stages=2)
PREFILL = Shape(rows=64, tile_elements=4096, num_warps=4, num_stages=3)
# Splitting stops once the grid holds this many programs per multiprocessor,
# and a split gets at least this many keys (shorter ones cost more to merge and
# launch than they save).
_PROGRAMS_PER_SM = 4
_MIN_KEYS_PER_SPLIT = 512
_MAX_SPLITS = 32
# The interpreter has no multiprocessors; this count sizes its splits.
_INTERPRETER_SMS = 4


@functools.lru_cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _choose_splits(num_programs: int, max_keys: int, device: torch.device) -> int:
    """Splits per sequence so that a decode grid fills the GPU (1: no split)."""
    wanted = _PROGRAMS_PER_SM * _num_sms(device)
    if num_programs >= wanted:
        return 1
    by_length = max(1, max_keys // _MIN_KEYS_PER_SPLIT)
    return max(1, min(math.ceil(wanted / num_programs), by_length, _MAX_SPLITS))


@dataclass(frozen=True)
class Plan:
    shape: Shape
    block_m: int
    num_q_blocks: int
    num_splits: int
    one_block_per_seq: bool


def plan(
    num_tokens: int,
    num_seqs: int,
    num_kv_heads: int,
    group: int,
    max_query_len: int,
    max_keys: int,
    num_splits: int | None,
    device: torch.device,
) -> Plan:
    """Pick the mode: decode-like (one query block per sequence, maybe split) or prefill."""
    block_m = max(DECODE.rows, triton.next_power_of_2(group))
    # When every sequence's new tokens fit one query block, program i takes
    # sequence i and needs no search.
    if max_query_len <= block_m // group:
        if num_splits is None:
            num_splits = _choose_splits(num_seqs * num_kv_heads, max_keys, device)
        return Plan(DECODE, block_m, num_seqs, num_splits, one_block_per_seq=True)
    block_m = max(PREFILL.rows, block_m)
    # Each sequence may end in one partly filled block: at most num_seqs more.
    num_q_blocks = num_tokens // (block_m // group) + num_seqs
    return Plan(PREFILL, block_m, num_q_blocks, 1, one_block_per_seq=False)


def max_keys(max_seq_len: int, max_query_len: int, block_size: int, window: int | None) -> int:
    """The most keys a program of one query block walks: under a window, the window
    of its first token, from the start of that key's KV block, to its last token."""
    if window is None:
        return max_seq_len
    return min(max_seq_len, window + block_size - 1 + max_query_len - 1)
