"""FP8 weights: block-scaled FP8 checkpoints load as published and quantizing float
weights at load runs the per-channel round trip, both against Transformers on the float
weights they stand for; the saving shows in weight_bytes; unsupported layouts fail clearly."""

import json
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.quantization.fp8 import Fp8Linear
from tests.engine.hf_reference import hf_greedy
from tests.engine.quant_pack_fp8 import (
    FP8_MAX,
    write_fp8_checkpoint,
    write_per_channel_reference,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(count: int = 3, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(5, 30))] for _ in range(count)]


def _llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", num_device_blocks=64,
               swap_space_gib=0.01, **kwargs)


def _greedy(llm: LLM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp8_checkpoint_matches_its_dequantized_weights(make_checkpoint, tmp_path, arch):
    """Detected from config.json alone; Qwen2 adds the fused q/k/v bias."""
    src = make_checkpoint(arch=arch, num_heads=4, num_kv_heads=2, head_dim=16)
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "float")
    prompts = _prompts()
    llm = _llm(tmp_path / "fp8")
    assert _greedy(llm, prompts, 16) == hf_greedy(tmp_path / "float", prompts, 16,
                                                  ignore_eos=True)
    assert llm.engine.stats().weight_bytes < _llm(src).engine.stats().weight_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp8_at_load_matches_per_channel_round_trip(make_checkpoint, tmp_path, arch):
    src = make_checkpoint(arch=arch, num_heads=4, num_kv_heads=2, head_dim=16)
    write_per_channel_reference(src, tmp_path / "ref")
    prompts = _prompts()
    llm = _llm(src, quantization="fp8")
    assert _greedy(llm, prompts, 16) == hf_greedy(tmp_path / "ref", prompts, 16,
                                                  ignore_eos=True)


def test_fp8_weight_bytes(make_checkpoint):
    """Every projection drops from 4 bytes a weight to 1 (+ a float32 scale a row); the
    embeddings and LM head, untouched, stay 4 bytes."""
    src = make_checkpoint(num_heads=4, num_kv_heads=2, head_dim=16)
    config = json.loads((src / "config.json").read_text())
    hidden, inter, layers = (config["hidden_size"], config["intermediate_size"],
                             config["num_hidden_layers"])
    q, kv = hidden, 2 * 16
    rows = q + 2 * kv + hidden + 2 * inter + hidden  # output rows of the projections
    weights = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
    saved = layers * (3 * weights - 4 * rows)
    float_bytes = _llm(src).engine.stats().weight_bytes
    assert _llm(src, quantization="fp8").engine.stats().weight_bytes == float_bytes - saved


def test_scaled_mm_path_quantizes_tokens():
    """The GPU's path, forced on the CPU (torch implements _scaled_mm there too): each
    token rounded to float8 with its own scale, times the dequantized weight."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    fp8 = Fp8Linear.from_float(linear)
    fp8.scaled_mm = True
    x = torch.randn(5, 64) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [100.0]])
    scale = x.abs().amax(1, keepdim=True) / FP8_MAX
    x_q = (x / scale).to(torch.float8_e4m3fn).float() * scale
    w_q = fp8.weight.float() * fp8.weight_scale[:, None]
    want = x_q @ w_q.T + linear.bias
    # The product is rounded to bfloat16 (the output type row-wise scaling takes): within
    # 2^-8 of each row's largest value, the rows spanning five orders of magnitude.
    error = (fp8(x) - want).abs().detach()
    assert (error <= 2**-8 * want.abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize(("fields", "message"), [
    ({"activation_scheme": "static"}, "activation_scheme 'static'"),
    ({"weight_block_size": None}, "no weight_block_size"),
    ({"fmt": "e5m2"}, "'e5m2'"),
])
def test_unsupported_fp8_configs(make_checkpoint, tmp_path, fields, message):
    src = make_checkpoint(num_heads=4, num_kv_heads=2, head_dim=16)
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "float", **fields)
    with pytest.raises(ValueError, match=message):
        _llm(tmp_path / "fp8")


def test_int8_asked_of_an_fp8_checkpoint(make_checkpoint, tmp_path):
    src = make_checkpoint(num_heads=4, num_kv_heads=2, head_dim=16)
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "float")
    with pytest.raises(ValueError, match="'int8'.*'fp8'"):
        _llm(tmp_path / "fp8", quantization="int8")


def test_fused_shards_off_the_block_grid(make_checkpoint, tmp_path):
    """One KV head of 16 rows in blocks of 32: the k shard's scales end mid-block."""
    src = make_checkpoint(num_heads=4, num_kv_heads=1, head_dim=16)
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "float", block=(32, 32))
    with pytest.raises(ValueError, match=r"qkv_proj is fused .*\[64, 16, 16\]"):
        _llm(tmp_path / "fp8")


def test_fp8_checkpoint_of_a_mixture_of_experts(tmp_path):
    """Refused before any weight is read: the config alone decides."""
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                           num_local_experts=4, num_experts_per_tok=2,
                           architectures=["MixtralForCausalLM"]).to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [16, 16]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        _llm(tmp_path)
