"""Architecture name (config.json "architectures") -> model class."""

from engine.models.causal_lm import CausalLM
from engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from engine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from engine.models.mixtral import MixtralForCausalLM
from engine.models.phi3 import Phi3ForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM, Qwen3MoeForCausalLM

_MODELS: dict[str, type[CausalLM]] = {
    cls.__name__: cls for cls in (
        LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
        Qwen3MoeForCausalLM, Phi3ForCausalLM, MixtralForCausalLM, Gemma2ForCausalLM,
        Gemma3ForCausalLM,
    )
}


def get_model_class(architectures: list[str] | None) -> type[CausalLM]:
    for arch in architectures or []:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(
        f"unsupported architecture {architectures}; pagedq supports {', '.join(sorted(_MODELS))}"
    )
