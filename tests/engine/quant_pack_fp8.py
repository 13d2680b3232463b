"""Reference FP8 quantizers for the tests, written apart from the engine's code.

`write_fp8_checkpoint` turns a float checkpoint into one laid out as Qwen3-FP8 and
DeepSeek publish theirs (float8 e4m3 `weight` and float32 `weight_scale_inv`, one scale
per [rows, cols] block, `quantization_config` in config.json) and writes beside it the
float checkpoint those tensors dequantize to. `write_per_channel_reference` writes the
float checkpoint of a per-output-channel round trip, what quantizing at load should run.
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# The decoder layers' projections; embeddings, norms and the LM head stay float.
PROJECTION = re.compile(r".*layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")


def _tiles(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [out, in] zero-padded to whole blocks, as [row blocks, bo, col blocks, bi]."""
    bo, bi = block
    rows, cols = -(-w.shape[0] // bo), -(-w.shape[1] // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=w.dtype)
    padded[:w.shape[0], :w.shape[1]] = w
    return padded.view(rows, bo, cols, bi)


def block_quantize(w: torch.Tensor, block: tuple[int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 [out, in], float32 scale per block) with w ≈ value * its block's scale."""
    tiles = _tiles(w.float(), block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.view(tiles.shape[0] * block[0], -1)[:w.shape[0], :w.shape[1]].contiguous()
    return q, scale


def block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
                     ) -> torch.Tensor:
    tiles = _tiles(q.float(), block) * scale[:, None, :, None]
    return tiles.view(tiles.shape[0] * block[0], -1)[:q.shape[0], :q.shape[1]]


def channel_round_trip(w: torch.Tensor) -> torch.Tensor:
    """w quantized to float8 with one scale per output row (amax / 448), and back."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return ((w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale).to(w.dtype)


def _copy_folder(src: Path, dst: Path) -> None:
    """Everything but the weights: config, generation config, tokenizer files."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, dst / file.name)


def write_fp8_checkpoint(src: Path, fp8_dir: Path, dequantized_dir: Path,
                         block: tuple[int, int] = (16, 16),
                         **config_fields: object) -> None:
    """`config_fields` override the quantization_config written (activation_scheme...)."""
    fp8, dequantized = {}, {}
    for name, tensor in load_file(src / "model.safetensors").items():
        if not PROJECTION.fullmatch(name):
            fp8[name] = dequantized[name] = tensor
            continue
        q, scale = block_quantize(tensor, block)
        fp8[name] = q
        fp8[name.removesuffix("weight") + "weight_scale_inv"] = scale
        dequantized[name] = block_dequantize(q, scale, block).to(tensor.dtype)
    for folder, tensors in ((fp8_dir, fp8), (dequantized_dir, dequantized)):
        _copy_folder(src, folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "fmt": "e4m3", "weight_block_size": list(block),
                                     **config_fields}
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))


def write_per_channel_reference(src: Path, dst: Path) -> None:
    tensors = {name: channel_round_trip(t) if PROJECTION.fullmatch(name) else t
               for name, t in load_file(src / "model.safetensors").items()}
    _copy_folder(src, dst)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
