"""The attention backend is one object, chosen once by the factory, that plans each step once."""

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.attention_factory import make_backend
from engine.torch_attention import TorchBackend
from engine.triton_attention import TritonBackend

CPU = torch.device("cpu")


@pytest.mark.parametrize(("name", "cls"), [("torch", TorchBackend), ("triton", TritonBackend),
                                           ("auto", TorchBackend)])
def test_factory_returns_the_named_backend(name, cls):
    backend = make_backend(name, CPU, block_size=16)
    assert type(backend) is cls
    assert backend.block_size == 16


def test_factory_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="attention backend must be .* got 'flash'"):
        make_backend("flash", CPU, block_size=16)


def test_one_backend_prepares_once_per_step(tiny_llama_dir, monkeypatch):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu",
                                    attention_backend="torch", num_device_blocks=32,
                                    swap_space_gib=0.001, max_model_len=64))
    backend = engine.runner.backend
    # Chosen once: the layers, the runner and the cache engine share the object.
    assert engine.cache.backend is backend
    assert all(layer.self_attn.backend is backend for layer in engine.runner.model.layers)
    calls = []
    prepare = backend.prepare
    monkeypatch.setattr(backend, "prepare", lambda meta: (calls.append(meta), prepare(meta)))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", "The first request", greedy)
    engine.add_request("b", "and the second one", greedy)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert steps >= 4
    assert len(calls) == steps
    assert len({id(meta) for meta in calls}) == steps  # a fresh plan for each step's metadata
