"""Attention over the paged KV cache in plain torch: the CPU backend.

Decodes are batched: each gathers its context's K/V slots and the batch runs one
SDPA call per group of similar context lengths (padding every sequence to the
longest of a mixed batch would multiply the bytes gathered). Prefill chunks run
one sequence at a time; a whole prompt attends to the K/V it has just computed.
Every SDPA call is 4-D: on the CPU, 3-D inputs fall back to the unfused math
kernel, several times slower than the flash kernel.
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


@dataclass(slots=True)
class DecodeGroup:
    """Decodes of similar context length, attended in one SDPA call."""

    rows: torch.Tensor | None    # their rows among the decodes; None: all, in order
    slots: torch.Tensor          # [n * ctx] int64; past a sequence's end: its last slot
    mask: torch.Tensor | None    # [n, 1, 1, ctx] bool; None when all n hold ctx tokens
    num_seqs: int


def plan_decode_groups(meta: AttentionMetadata, block_size: int) -> list[DecodeGroup]:
    """Split the decodes, longest context first, into groups wasting little padding."""
    lens = meta.seq_lens_cpu[:meta.num_decodes]
    if not lens:
        return []
    longest, total = max(lens), sum(lens)
    if longest * len(lens) <= min((1 + MAX_PADDING) * total, MAX_GROUP_SLOTS):
        return [_decode_group(meta, None, block_size)]  # one group: no need to sort
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
        return [_decode_group(meta, None, block_size)]
    return [_decode_group(meta, rows, block_size) for rows in groups]


def _decode_group(meta: AttentionMetadata, rows: list[int] | None,
                  block_size: int) -> DecodeGroup:
    d = meta.num_decodes
    if rows is None:
        index, pick, lens_cpu = None, slice(0, d), meta.seq_lens_cpu[:d]
    else:
        index = pick = torch.tensor(rows, device=meta.seq_lens.device)
        lens_cpu = [meta.seq_lens_cpu[i] for i in rows]
    n, ctx = len(lens_cpu), max(lens_cpu)
    positions = torch.arange(ctx, device=meta.seq_lens.device).expand(n, ctx)
    last = meta.seq_lens[pick, None].long() - 1
    mask = None if min(lens_cpu) == ctx else (positions <= last)[:, None, None, :]
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
        self.decode_groups: list[DecodeGroup] = []  # the plan of the last `prepare`

    def prepare(self, meta: AttentionMetadata) -> None:
        # Every layer gathers the same slots: plan the decode groups once per step.
        self.decode_groups = plan_decode_groups(meta, self.block_size)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        d = meta.num_decodes
        if d == len(meta.seq_lens_cpu):
            return self._decode(q, k_cache, v_cache, scale)
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, scale)
        start = d
        for i in range(d, len(meta.seq_lens_cpu)):
            q_len, ctx = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            rows = slice(start, start + q_len)
            if q_len == ctx:  # a whole prompt: its K/V are this step's own
                out[rows] = _attend(q[rows], k[rows], v[rows], scale)
            else:
                table = meta.block_tables[i, :-(-ctx // self.block_size)].long()
                out[rows] = _attend(q[rows], _gather(k_cache, table, ctx),
                                    _gather(v_cache, table, ctx), scale)
            start += q_len
        return out

    def copy_blocks(self, kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
        kv_cache[:, :, pairs[:, 1]] = kv_cache[:, :, pairs[:, 0]]

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: torch.Tensor) -> None:
        kernels.swap_blocks(src_cache, dst_cache, pairs)  # plain torch, no Triton

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                scale: float) -> torch.Tensor:
        groups = self.decode_groups
        if groups[0].rows is None:  # one group, in batch order
            return _attend_decodes(q, k_cache, v_cache, groups[0], scale)
        out = torch.empty_like(q)
        for group in groups:
            out.index_copy_(0, group.rows, _attend_decodes(
                q.index_select(0, group.rows), k_cache, v_cache, group, scale))
        return out


def _attend_decodes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    group: DecodeGroup, scale: float) -> torch.Tensor:
    """One decode group's queries [n, h, hd] over the slots it gathers."""
    n, (kvh, hd) = group.num_seqs, k_cache.shape[2:]
    k = k_cache.flatten(0, 1).index_select(0, group.slots).view(n, -1, kvh, hd)
    v = v_cache.flatten(0, 1).index_select(0, group.slots).view(n, -1, kvh, hd)
    # One query token per sequence: the heads sharing a KV head become its rows.
    out = F.scaled_dot_product_attention(q.view(n, kvh, -1, hd), k.transpose(1, 2),
                                         v.transpose(1, 2), attn_mask=group.mask, scale=scale)
    return out.reshape(q.shape)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, ctx: int) -> torch.Tensor:
    """A sequence's block ids -> its [ctx, num_kv_heads, head_dim] K or V."""
    return cache.index_select(0, block_table).flatten(0, 1)[:ctx]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's new tokens [q_len, h, hd], which end its context k/v [ctx, kvh, hd]."""
    q_len, ctx = q.shape[0], k.shape[0]
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if q_len == ctx:
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale,
                                             enable_gqa=True)
    else:
        # Token i sees keys 0..ctx-q_len+i.
        rows = torch.arange(q_len, device=q.device)[:, None] + (ctx - q_len)
        mask = torch.arange(ctx, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
    return out[0].transpose(0, 1)
