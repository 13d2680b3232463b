"""Attention over the paged KV cache in plain torch: the CPU backend.

Decodes are batched: each gathers its context's K/V slots and the batch runs one
SDPA call per group of similar context lengths (padding every sequence to the
longest of a mixed batch would multiply the bytes gathered). Prefill chunks run
one sequence at a time; a whole prompt attends to the K/V it has just computed.
Every SDPA call is 4-D: on the CPU, 3-D inputs fall back to the unfused math
kernel, several times slower than the flash kernel.

Under a sliding window w a token at position p sees keys p-w+1 .. p: decodes and
chunks gather only the keys their windows show (blocks left of them may have been
freed). SDPA has no soft-cap: soft-capped layers run eager attention instead.

A float8 cache holds K / k_scale and V / v_scale, saturated at +-448; what a layer
gathers from it is turned back into the query's dtype (float32, times the scale).
Whole prompts then read their K/V from the cache too, as the Triton kernel does, so
that both backends attend to the same rounded values.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from engine.attention import AttentionBackend, AttentionMetadata

# A decode group's padded slots may exceed its sequences' own by this fraction.
MAX_PADDING = 0.25
# And a group gathers at most this many slots, so its K/V stay in the CPU's cache
# between the gather and the attention that reads them.
MAX_GROUP_SLOTS = 8192
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value: larger entries saturate, not become NaN


@dataclass(slots=True)
class DecodeGroup:
    """Decodes of similar context length, attended in one SDPA call."""

    rows: torch.Tensor | None    # their rows among the decodes; None: all, in order
    slots: torch.Tensor          # [n * ctx] int64; past a sequence's end: its last slot
    mask: torch.Tensor | None    # [n, 1, 1, ctx] bool; None when all n hold ctx tokens
    num_seqs: int


def plan_decode_groups(meta: AttentionMetadata, block_size: int,
                       window: int | None = None) -> list[DecodeGroup]:
    """Split the decodes, most visible keys first, into groups wasting little padding;
    under a `window`, each gathers only the last `window` keys of its context."""
    lens = _visible(meta.seq_lens_cpu[:meta.num_decodes], window)
    if not lens:
        return []
    longest, total = max(lens), sum(lens)
    if longest * len(lens) <= min((1 + MAX_PADDING) * total, MAX_GROUP_SLOTS):
        return [_decode_group(meta, None, block_size, window)]  # one group: no need to sort
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups, start = [], 0
    while start < len(order):
        end, real = start + 1, lens[order[start]]
        while end < len(order):
            padded = lens[order[start]] * (end + 1 - start)
            if padded > min((1 + MAX_PADDING) * (real + lens[order[end]]), MAX_GROUP_SLOTS):
                break
            real += lens[order[end]]
            end += 1
        groups.append(order[start:end])
        start = end
    if len(groups) == 1:
        return [_decode_group(meta, None, block_size, window)]
    return [_decode_group(meta, rows, block_size, window) for rows in groups]


def _visible(seq_lens: list[int], window: int | None) -> list[int]:
    """How many keys each sequence's last token sees."""
    return seq_lens if window is None else [min(n, window) for n in seq_lens]


def _decode_group(meta: AttentionMetadata, rows: list[int] | None, block_size: int,
                  window: int | None) -> DecodeGroup:
    d = meta.num_decodes
    if rows is None:
        index, pick, lens_cpu = None, slice(0, d), meta.seq_lens_cpu[:d]
    else:
        index = pick = torch.tensor(rows, device=meta.seq_lens.device)
        lens_cpu = [meta.seq_lens_cpu[i] for i in rows]
    visible = _visible(lens_cpu, window)
    n, ctx = len(visible), max(visible)
    seq_lens = meta.seq_lens[pick, None].long()
    first = 0 if window is None else (seq_lens - window).clamp(min=0)
    positions = first + torch.arange(ctx, device=meta.seq_lens.device).expand(n, ctx)
    last = seq_lens - 1
    mask = None if min(visible) == ctx else (positions <= last)[:, None, None, :]
    # Padding reads the sequence's own last slot rather than a never-written one,
    # which may hold anything (NaN included, and 0 * NaN is NaN even when masked).
    positions = torch.minimum(positions, last)
    blocks = meta.block_tables[pick].long().gather(1, positions // block_size)
    slots = (blocks * block_size + positions % block_size).flatten()
    return DecodeGroup(index, slots, mask, n)


class TorchBackend(AttentionBackend):
    """Plain torch: the CPU backend, and a reference on CUDA."""

    def __init__(self, block_size: int) -> None:
        super().__init__(block_size)
        self._meta: AttentionMetadata | None = None  # the step of the last `prepare`
        self._decode_plans: dict[int | None, list[DecodeGroup]] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        # Layers of one window gather the same slots: each window's decode groups are
        # planned once per step, by its first layer.
        self._meta = meta
        self._decode_plans = {}

    def decode_groups(self, window: int | None = None) -> list[DecodeGroup]:
        """The decode groups of the prepared step for layers of this window."""
        meta = self._meta
        if window is not None and window >= max(meta.seq_lens_cpu[:meta.num_decodes], default=0):
            window = None  # it hides no key: share the global layers' plan
        plan = self._decode_plans.get(window)
        if plan is None:
            plan = self._decode_plans[window] = plan_decode_groups(meta, self.block_size, window)
        return plan

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                 v_scale: float = 1.0) -> None:
        if k_cache.dtype == FP8:  # index_copy_ has no float8 kernel: write the bytes
            k = quantize_fp8(k, k_scale).view(torch.uint8)
            v = quantize_fp8(v, v_scale).view(torch.uint8)
            k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, window: int | None = None,
               softcap: float | None = None, k_scale: float = 1.0,
               v_scale: float = 1.0) -> torch.Tensor:
        d, kv_scales = meta.num_decodes, (k_scale, v_scale)
        if d == len(meta.seq_lens_cpu):
            return self._decode(q, k_cache, v_cache, scale, window, softcap, kv_scales)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, scale, window, softcap, kv_scales)
        start = d
        for i in range(d, len(meta.seq_lens_cpu)):
            q_len, ctx = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            rows = slice(start, start + q_len)
            # A whole prompt attends to the K/V it has just computed (unless they were
            # rounded to float8 on the way into the cache).
            if q_len == ctx and k_cache.dtype != FP8:
                out[rows] = _attend(q[rows], k[rows], v[rows], scale, window, softcap)
            else:
                # From the block of the lowest key the chunk's first token sees.
                lowest = 0 if window is None else max(0, ctx - q_len - window + 1)
                first = lowest // self.block_size
                table = meta.block_tables[i, first:-(-ctx // self.block_size)].long()
                num_keys = ctx - first * self.block_size
                k_ctx = _gather(k_cache, table, num_keys, k_scale, q.dtype)
                v_ctx = _gather(v_cache, table, num_keys, v_scale, q.dtype)
                out[rows] = _attend(q[rows], k_ctx, v_ctx, scale, window, softcap)
            start += q_len
        return out

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
        if kv_cache.dtype == FP8:  # a copy moves bits; not every device indexes float8
            kv_cache = kv_cache.view(torch.uint8)
        kv_cache[:, :, pairs[:, 1]] = kv_cache[:, :, pairs[:, 0]]

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: torch.Tensor) -> None:
        kernels.swap_blocks(src_cache, dst_cache, pairs)  # plain torch, no Triton

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                scale: float, window: int | None, softcap: float | None,
                kv_scales: tuple[float, float]) -> torch.Tensor:
        groups = self.decode_groups(window)
        if groups[0].rows is None:  # one group, in batch order
            return _attend_decodes(q, k_cache, v_cache, groups[0], scale, softcap, kv_scales)
        out = torch.empty_like(q)
        for group in groups:
            out.index_copy_(0, group.rows, _attend_decodes(
                q.index_select(0, group.rows), k_cache, v_cache, group, scale, softcap,
                kv_scales))
        return out


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in float32, saturated at +-448, rounded to float8 e4m3 (to nearest even)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def _dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Entries gathered from a cache, in the query's dtype: float8 ones times their scale."""
    return x if x.dtype != FP8 else (x.float() * scale).to(dtype)


def _attend_decodes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    group: DecodeGroup, scale: float, softcap: float | None,
                    kv_scales: tuple[float, float]) -> torch.Tensor:
    """One decode group's queries [n, h, hd] over the slots it gathers."""
    n, (kvh, hd) = group.num_seqs, k_cache.shape[2:]
    k = _dequantize(k_cache.flatten(0, 1).index_select(0, group.slots), kv_scales[0], q.dtype)
    v = _dequantize(v_cache.flatten(0, 1).index_select(0, group.slots), kv_scales[1], q.dtype)
    k, v = k.view(n, -1, kvh, hd), v.view(n, -1, kvh, hd)
    # One query token per sequence: the heads sharing a KV head become its rows.
    out = _sdpa(q.view(n, kvh, -1, hd), k.transpose(1, 2), v.transpose(1, 2), group.mask,
                scale, softcap)
    return out.reshape(q.shape)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, num_keys: int, scale: float,
            dtype: torch.dtype) -> torch.Tensor:
    """The first `num_keys` tokens of these blocks, [num_keys, num_kv_heads, head_dim],
    in the query's `dtype`."""
    return _dequantize(cache.index_select(0, block_table).flatten(0, 1)[:num_keys], scale, dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            window: int | None, softcap: float | None) -> torch.Tensor:
    """One sequence's new tokens [q_len, h, hd], which end the keys k/v [n, kvh, hd]."""
    q_len, num_keys = q.shape[0], k.shape[0]
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if q_len == num_keys and window is None and softcap is None:
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        # Token i sits at key index num_keys-q_len+i: it sees the keys up to there,
        # and under a window only the last `window` of them.
        rows = torch.arange(q_len, device=q.device)[:, None] + (num_keys - q_len)
        keys = torch.arange(num_keys, device=q.device)[None, :]
        mask = keys <= rows
        if window is not None:
            mask &= keys > rows - window
        out = _sdpa(q4, k4, v4, mask[None, None], scale, softcap)
    return out[0].transpose(0, 1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float, softcap: float | None) -> torch.Tensor:
    """SDPA of q [b, h, q_len, hd] over k/v [b, kvh, n, hd] under a 4-D bool mask; with
    a soft-cap (which SDPA lacks), eager attention in Gemma 2's order: scale, cap, mask,
    softmax in float32."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    b, h, q_len, hd = q.shape
    kvh, num_keys = k.shape[1], k.shape[2]
    # The query heads sharing a KV head become rows of one matmul against it.
    scores = q.reshape(b, kvh, -1, hd) @ k.transpose(2, 3) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.view(b, kvh, -1, q_len, num_keys).masked_fill(
            ~mask.unsqueeze(2), float("-inf")).view(b, kvh, -1, num_keys)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).view(b, h, q_len, hd)
