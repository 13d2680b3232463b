"""Reference 4-bit packers for the tests, written apart from the engine's code.

`write_int4_checkpoint` quantizes a float checkpoint's decoder projections with
round-to-nearest per group of inputs and writes them as AutoAWQ ("gemm") or
AutoGPTQ ("gptq" format) do: int32 words holding eight 4-bit values, the first in
the lowest bits, a `quantization_config` in config.json. Beside it goes the float
checkpoint the packed tensors stand for, every projection replaced by its
dequantized values: what the engine must reproduce.

- AWQ: qweight [in, out / 8] with output columns 0, 2, 4, 6, 1, 3, 5, 7 of each
  eight in nibbles 0..7; qzeros [groups, out / 8] likewise; scales [groups, out]
  float16; asymmetric (zero_point true).
- GPTQ: qweight [in / 8, out] with 8 consecutive inputs a word; qzeros
  [groups, out / 8] with 8 consecutive outputs a word, each stored minus one;
  scales [groups, out] float16; g_idx [in] each input's group: in order, or for
  desc_act an order shared by the projections that read the same input.
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROJECTION = re.compile(
    r"(?P<prefix>.*layers\.(?P<layer>\d+)\.(self_attn|mlp))\.(?P<proj>q|k|v|o|gate|up|down)"
    r"_proj\.weight")
# Projections that read the same input share an act-order permutation.
INPUT_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp",
            "down": "down"}
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
MAXQ = 15


def quantize(w: torch.Tensor, groups: torch.Tensor, sym: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of w [out, in] in the groups of inputs `groups[k]` names:
    (q [out, in] in 0..15, zero [out, G] int, scale [out, G] float16) with
    w ~ (q - zero) * scale. Asymmetric groups span min..max (0 included, as AutoGPTQ
    does); symmetric ones -amax..amax around zero point 8."""
    num_groups = int(groups.max()) + 1
    w = w.float()
    zero = torch.empty(w.shape[0], num_groups, dtype=torch.int64)
    scale = torch.empty(w.shape[0], num_groups, dtype=torch.float16)
    for g in range(num_groups):
        cols = w[:, groups == g]
        if sym:
            s = (2 * cols.abs().amax(dim=1) / MAXQ).clamp(min=1e-5).half()
            z = torch.full((w.shape[0],), (MAXQ + 1) // 2)
        else:
            lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            s = ((hi - lo) / MAXQ).clamp(min=1e-5).half()
            # GPTQ's v1 format stores zero - 1 in 4 bits: a zero of 0 would not survive.
            z = torch.round(-lo / s.float()).clamp(1, MAXQ).long()
        scale[:, g], zero[:, g] = s, z
    s_k, z_k = scale[:, groups].float(), zero[:, groups]
    q = (torch.round(w / s_k) + z_k).clamp(0, MAXQ).long()
    return q, zero, scale


def dequantize(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
               groups: torch.Tensor) -> torch.Tensor:
    return (q - zero[:, groups]).float() * scale[:, groups].float()


def pack_columns(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """[R, C] 4-bit values -> [R, C / 8] int32: nibble j of word c holds column
    8 c + order[j]."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for j, column in enumerate(order):
        packed |= (values[:, column::8] & 0xF) << (4 * j)
    return _as_int32(packed)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values -> [R / 8, C] int32: nibble j of word r holds row 8 r + j."""
    return pack_columns(values.T.contiguous(), tuple(range(8))).T.contiguous()


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words into int32 two's complement."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _groups(in_features: int, group_size: int, order: torch.Tensor | None) -> torch.Tensor:
    """Each input's group: consecutive runs, or runs of `order` (act-order's g_idx)."""
    size = in_features if group_size == -1 else group_size
    rank = torch.arange(in_features) if order is None else torch.argsort(order)
    return rank // size


def pack(method: str, q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
          groups: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of one projection (q [out, in], zero and scale [out, G])."""
    if method == "awq":
        return {"qweight": pack_columns(q.T.contiguous(), AWQ_ORDER),
                "qzeros": pack_columns(zero.T.contiguous(), AWQ_ORDER),
                "scales": scale.T.contiguous()}
    return {"qweight": pack_rows(q.T.contiguous()),
            "qzeros": pack_columns(zero.T.contiguous() - 1, tuple(range(8))),
            "scales": scale.T.contiguous(), "g_idx": groups.to(torch.int32)}


def quantization_config(method: str, group_size: int, sym: bool, desc_act: bool) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size,
                "zero_point": True, "version": "gemm"}
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "checkpoint_format": "gptq", "damp_percent": 0.01}


def write_int4_checkpoint(src: Path, packed_dir: Path, dequantized_dir: Path, method: str,
                          group_size: int = 32, sym: bool = False, desc_act: bool = False,
                          not_converted: tuple[str, ...] = (), **config_fields: object) -> None:
    """`method` "awq" or "gptq"; projections whose name holds one of `not_converted`
    stay float (listed as modules_to_not_convert); `config_fields` override the
    quantization_config."""
    if method == "awq" and (sym or desc_act):
        raise ValueError("AWQ is asymmetric and in input order")
    packed, dequantized = {}, {}
    orders: dict[tuple[str, str], torch.Tensor] = {}
    for name, tensor in load_file(src / "model.safetensors").items():
        match = PROJECTION.fullmatch(name)
        if not match or any(entry in name for entry in not_converted):
            packed[name] = dequantized[name] = tensor
            continue
        order = None
        if desc_act:
            key = (match["layer"], INPUT_OF[match["proj"]])
            if key not in orders:
                seeded = torch.Generator().manual_seed(len(orders))
                orders[key] = torch.randperm(tensor.shape[1], generator=seeded)
            order = orders[key]
        groups = _groups(tensor.shape[1], group_size, order)
        q, zero, scale = quantize(tensor, groups, sym)
        base = name.removesuffix("weight")
        for suffix, t in pack(method, q, zero, scale, groups).items():
            packed[base + suffix] = t
        dequantized[name] = dequantize(q, zero, scale, groups).to(tensor.dtype)
    for folder, tensors in ((packed_dir, packed), (dequantized_dir, dequantized)):
        copy_folder(src, folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {**quantization_config(method, group_size, sym, desc_act),
                                     "modules_to_not_convert": list(not_converted) or None,
                                     **config_fields}
    (packed_dir / "config.json").write_text(json.dumps(config, indent=2))


def copy_folder(src: Path, dst: Path) -> None:
    """Everything but the weights: config, generation config, tokenizer files."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, dst / file.name)
