"""What a request needs from the loaded model and the engine's limits, checked before
the engine takes it: a request that passes can be scheduled and sampled.

`SamplingParams` checks what holds for any model; this checks the rest (vocabulary,
lengths, step and pool sizes). Every error is a ValueError naming the field.
"""

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.sampling_params import BeamSearchParams, SamplingParams, is_finite_number

Prompt = str | list[int]
Params = SamplingParams | BeamSearchParams


class RequestChecker:
    def __init__(self, config: EngineConfig, model_path: Path, vocab_size: int,
                 max_model_len: int, tokenizer: PreTrainedTokenizerBase | None,
                 block_manager: BlockManager) -> None:
        self.config = config
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.block_manager = block_manager

    def check(self, prompt: Prompt, params: Params, priority: int,
              deadline: float | None) -> list[int]:
        """Raise ValueError for anything this engine cannot run; return the prompt's ids."""
        if not isinstance(params, SamplingParams | BeamSearchParams):
            raise ValueError(f"params must be SamplingParams or BeamSearchParams, got "
                             f"{type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an int, got {priority!r}")
        if deadline is not None and not is_finite_number(deadline):
            raise ValueError(f"deadline must be None or a finite time, got {deadline!r}")
        token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is "
                             f"{self.max_model_len} (prompt plus at least one new token)")
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got "
                             f"{params.stop_token_ids!r}")
        self._check_width(params)
        if isinstance(params, BeamSearchParams):
            self._check_beam_fits(token_ids, params)
        return token_ids

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"checkpoint {self.model_path} has no tokenizer: "
                                 "pass the prompt as a list of token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a str or a list of int token ids")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def _check_width(self, params: Params) -> None:
        """A request's samples or beams decode in the same step, so they must fit in one."""
        name = "n" if isinstance(params, SamplingParams) else "beam_width"
        width = getattr(params, name)
        cfg = self.config
        limit = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        if width > limit:
            raise ValueError(
                f"{name} must be <= {limit} (a step holds max_num_seqs {cfg.max_num_seqs} "
                f"sequences and max_num_batched_tokens {cfg.max_num_batched_tokens} "
                f"tokens), got {width}")

    def _check_beam_fits(self, token_ids: list[int], params: BeamSearchParams) -> None:
        """Beams share the prompt's blocks; each needs its own blocks for what it generates."""
        bm = self.block_manager
        new_tokens = min(params.max_tokens, self.max_model_len - len(token_ids))
        need = bm.blocks_for(len(token_ids)) + params.beam_width * (bm.blocks_for(new_tokens) + 1)
        if need > bm.device.num_blocks:
            raise ValueError(
                f"beam_width {params.beam_width} needs up to {need} KV blocks for beam search "
                f"but the device pool holds {bm.device.num_blocks}"
            )
