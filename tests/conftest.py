"""Shared fixtures: the built-in model and small random checkpoints written with save_pretrained."""

import os

import torch

# Kernels run in Triton's interpreter on CPU tensors; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from engine.model_loader import resolve_model_path  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a loaded machine a second thread that
    spins between ops can make a step 100x slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The built-in SmolLM2-135M-Instruct, converted once into the cache folder."""
    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, smollm2_dir):
    """Build (once per argument set) a random float32 checkpoint folder.

    Weights are drawn with a large std so next-token logits have clear margins:
    greedy parity then tests the engine, not float-order ties.
    """
    built: dict[tuple, Path] = {}

    def build(arch: str = "llama", num_heads: int = 4, num_kv_heads: int = 2,
              head_dim: int = 16, layers: int = 2, vocab: int = 512, tokenizer: bool = False,
              rope: dict | None = None) -> Path:
        key = (arch, num_heads, num_kv_heads, head_dim, layers, vocab, tokenizer,
               tuple(sorted((rope or {}).items())))
        if key in built:
            return built[key]
        from transformers import AutoTokenizer, LlamaConfig, Qwen2Config
        from transformers import LlamaForCausalLM as HFLlama
        from transformers import Qwen2ForCausalLM as HFQwen2

        if tokenizer:
            vocab = len(AutoTokenizer.from_pretrained(smollm2_dir))
        common = dict(
            hidden_size=num_heads * head_dim, intermediate_size=2 * num_heads * head_dim,
            num_hidden_layers=layers, num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads, head_dim=head_dim, vocab_size=vocab,
            max_position_embeddings=1024, initializer_range=0.25, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2,
        )
        if rope:
            common["rope_parameters"] = {"rope_theta": 10000.0, **rope}
        cls, cfg = ((HFQwen2, Qwen2Config(**common)) if arch == "qwen2"
                    else (HFLlama, LlamaConfig(**common)))
        torch.manual_seed(len(built))
        model = cls(cfg)
        path = tmp_path_factory.mktemp(f"{arch}-{num_heads}x{num_kv_heads}")
        model.save_pretrained(path)
        if tokenizer:
            AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
        built[key] = path
        return path

    return build


@pytest.fixture(scope="session")
def tiny_llama_dir(make_checkpoint) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer beside it: str prompts work, fast on CPU."""
    return make_checkpoint(num_heads=4, num_kv_heads=2, head_dim=16, tokenizer=True)
