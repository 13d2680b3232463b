"""Weight-only quantization: AWQ and GPTQ 4-bit checkpoints written by the tests' own
packer (quant_pack_int4) load from config.json alone and generate what Transformers
generates from the float weights they stand for; int8 at load matches Transformers on
the per-channel int8 round trip. The saving shows in weight_bytes, byte for byte;
unsupported checkpoints and mismatched requests fail with errors naming the problem."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.quantization.int4_linear import Int4Format, Int4Linear
from engine.quantization.int8 import Int8Linear
from tests.engine.families import build
from tests.engine.hf_reference import hf_greedy
from tests.engine.quant_pack_int4 import (
    copy_folder,
    dequantize,
    pack,
    quantize,
    write_int4_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD_DIM = 16
TOKENS = 16


def _prompts(count: int = 3, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(5, 30))] for _ in range(count)]


def _llm(path: Path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", num_device_blocks=64,
               swap_space_gib=0.01, **kwargs)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _projections(src: Path) -> list[tuple[int, int]]:
    """(in, out) of every fused projection the engine holds: qkv, o, gate_up, down."""
    c = json.loads((src / "config.json").read_text())
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * HEAD_DIM, c["num_key_value_heads"] * HEAD_DIM
    layer = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * inter), (inter, hidden)]
    return layer * c["num_hidden_layers"]


def _int4_bytes(src: Path, group_size: int, g_idx: bool) -> int:
    """What the projections' weights take in 4 bits (bias aside): qweight, int32 zero
    points of 8 outputs, float16 scales, an int32 g_idx if kept; minus what they took
    in float32."""
    total = 0
    for fan_in, fan_out in _projections(src):
        groups = -(-fan_in // (fan_in if group_size == -1 else group_size))
        total += fan_in * fan_out // 2 + groups * fan_out // 2 + groups * fan_out * 2
        total += 4 * fan_in * g_idx - 4 * fan_in * fan_out
    return total


CASES = {
    "awq-llama-g32": ("llama", "awq", {"group_size": 32}),
    "awq-qwen2-whole-rows": ("qwen2", "awq", {"group_size": -1}),
    "gptq-llama-sym": ("llama", "gptq", {"group_size": 32, "sym": True}),
    "gptq-qwen2-asym": ("qwen2", "gptq", {"group_size": 64}),
    "gptq-llama-act-order": ("llama", "gptq", {"group_size": 32, "desc_act": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_int4_checkpoint_matches_its_dequantized_weights(make_checkpoint, tmp_path, case):
    """Detected from config.json alone (no quantization= given); Qwen2 adds the q/k/v
    bias, kept float beside the packed weights."""
    arch, method, options = CASES[case]
    src = make_checkpoint(arch=arch, num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM)
    write_int4_checkpoint(src, tmp_path / "q", tmp_path / "float", method, **options)
    prompts = _prompts()
    llm = _llm(tmp_path / "q")
    assert _greedy(llm, prompts) == hf_greedy(tmp_path / "float", prompts, TOKENS,
                                              ignore_eos=True)
    saved = _int4_bytes(src, options["group_size"], options.get("desc_act", False))
    float_bytes = _llm(src).engine.stats().weight_bytes
    assert llm.engine.stats().weight_bytes == float_bytes + saved


def test_modules_to_not_convert_stay_float(make_checkpoint, tmp_path):
    src = make_checkpoint(num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM)
    write_int4_checkpoint(src, tmp_path / "q", tmp_path / "float", "awq",
                          not_converted=("layers.1.mlp",))
    prompts = _prompts()
    assert _greedy(_llm(tmp_path / "q"), prompts) == hf_greedy(tmp_path / "float", prompts,
                                                               TOKENS, ignore_eos=True)


@pytest.mark.parametrize(("method", "sym", "act_order"),
                         [("awq", False, False), ("gptq", True, False), ("gptq", False, True)])
@pytest.mark.parametrize("use_triton", [False, True])
def test_int4_linear_paths(method, sym, act_order, use_triton):
    """One fused-like projection (two shards, a bias), both forward paths: the torch one
    the CPU runs and the Triton one a GPU runs (here interpreted), against x @ W.T with
    W the packer's dequantized weight."""
    torch.manual_seed(0)
    fan_in, fan_out, group_size = 96, 40, 32
    float_linear = torch.nn.Linear(fan_in, 2 * fan_out)
    order = torch.randperm(fan_in) if act_order else None
    groups = (torch.argsort(order) if act_order else torch.arange(fan_in)) // group_size
    shards = [pack(method, *quantize(w, groups, sym), groups)
              for w in float_linear.weight.detach().split(fan_out)]
    fmt = Int4Format(awq=method == "awq", group_size=group_size,
                     zero_offset=0 if method == "awq" else 1)
    with torch.device("meta"):
        meta = torch.nn.Linear(fan_in, 2 * fan_out)
    linear = Int4Linear(meta, fmt, num_shards=2).to_empty(device="cpu")
    with torch.no_grad():
        for name, param in linear.named_parameters():
            dim = 0 if name in ("g_idx", "bias") else 1
            whole = (float_linear.bias if name == "bias"
                     else torch.cat([shard[name] for shard in shards], dim=dim))
            param.copy_(whole)
    linear.finish()
    assert (linear.g_idx is not None) == act_order
    linear.use_triton = use_triton
    w = torch.cat([dequantize(*quantize(w, groups, sym), groups)
                   for w in float_linear.weight.detach().split(fan_out)])
    x = torch.randn(5, fan_in)
    expected = x.double() @ w.double().T + float_linear.bias.detach().double()
    torch.testing.assert_close(linear(x).double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("use_triton", [False, True])
def test_int8_linear_paths(use_triton):
    torch.manual_seed(0)
    float_linear = torch.nn.Linear(72, 40)
    linear = Int8Linear(float_linear)
    linear.use_triton = use_triton
    x = torch.randn(5, 72)
    w = int8_round_trip(float_linear.weight.detach())
    expected = x.double() @ w.double().T + float_linear.bias.detach().double()
    torch.testing.assert_close(linear(x).double(), expected, rtol=1e-5, atol=1e-4)


def int8_round_trip(w: torch.Tensor) -> torch.Tensor:
    """w quantized to int8 per output row (scale amax / 127, rounded to nearest), and back."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return (torch.round(w / scale).clamp(-127, 127) * scale).to(w.dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_at_load_matches_per_channel_round_trip(make_checkpoint, tmp_path, arch):
    src = make_checkpoint(arch=arch, num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM)
    tensors = {name: int8_round_trip(t) if name.endswith("_proj.weight") else t
               for name, t in load_file(src / "model.safetensors").items()}
    copy_folder(src, tmp_path / "ref")
    save_file(tensors, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    prompts = _prompts()
    llm = _llm(src, quantization="int8")
    assert _greedy(llm, prompts) == hf_greedy(tmp_path / "ref", prompts, TOKENS,
                                              ignore_eos=True)
    # 1 byte a weight and a float32 scale a row, where there were 4 bytes a weight.
    saved = sum(4 * fan_out - 3 * fan_in * fan_out for fan_in, fan_out in _projections(src))
    assert llm.engine.stats().weight_bytes == _llm(src).engine.stats().weight_bytes + saved


def _with_quantization_config(src: Path, dst: Path, config: dict) -> Path:
    """src's folder, weights linked, with `config` as its quantization_config."""
    copy_folder(src, dst)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    hf = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**hf, "quantization_config": config}))
    return dst


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
       "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq"}
REFUSED = {
    "awq-3-bit": ({**AWQ, "bits": 3}, "bits=3"),
    "gptq-3-bit": ({**GPTQ, "bits": 3}, "bits=3"),
    "awq-gemv": ({**AWQ, "version": "gemv"}, "'gemv'"),
    "awq-no-zero-point": ({**AWQ, "zero_point": False}, "zero_point"),
    "gptq-marlin": ({**GPTQ, "checkpoint_format": "marlin"}, "'marlin'"),
    "gptq-lm-head": ({**GPTQ, "lm_head": True}, "lm_head"),
    "split-fusion": ({**AWQ, "modules_to_not_convert": ["q_proj"]}, "modules_to_not_convert"),
    "int8-checkpoint": ({"quant_method": "int8", "bits": 8}, "int8"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_checkpoints_are_refused(make_checkpoint, tmp_path, case):
    config, named = REFUSED[case]
    path = _with_quantization_config(make_checkpoint(), tmp_path / "ckpt", config)
    with pytest.raises(ValueError, match=named):
        _llm(path)


def test_int4_mixture_of_experts_is_refused(tmp_path):
    src = build("mixtral", tmp_path / "mixtral")
    path = _with_quantization_config(src, tmp_path / "awq", AWQ)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        _llm(path)


def test_quantization_asked_against_the_checkpoint_is_refused(make_checkpoint, tmp_path):
    src = make_checkpoint()
    with pytest.raises(ValueError, match="needs a checkpoint quantized"):
        _llm(src, quantization="awq")
    with pytest.raises(ValueError, match="needs a checkpoint quantized"):
        _llm(src, quantization="gptq")
    awq = _with_quantization_config(src, tmp_path / "awq", AWQ)
    with pytest.raises(ValueError, match="'int8' was asked for.*quantized with 'awq'"):
        _llm(awq, quantization="int8")
