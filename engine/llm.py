"""LLM: the offline entry point, generate and beam_search over a list of prompts."""

from dataclasses import replace

from tqdm import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request_checks import Prompt
from engine.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m", **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._next_id = 0

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks (nothing to stop with one rank)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model_path(self):
        return self.engine.model_path

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = _as_list(prompts)
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        # Only the final outputs are read: the engine skips the reports in between.
        final = {id(p): replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                 for p in params if isinstance(p, SamplingParams)}
        return self._run(prompts, [final.get(id(p), p) for p in params], use_tqdm)

    def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = _as_list(prompts)
        return self._run(prompts, [params] * len(prompts), use_tqdm)

    def _run(self, prompts: list[Prompt], params: list, use_tqdm: bool) -> list[RequestOutput]:
        ids = [f"llm-{self._next_id + i}" for i in range(len(prompts))]
        # All or none: one bad prompt must not leave the others running in the engine.
        self.engine.add_requests([(request_id, prompt, p, 0) for request_id, prompt, p
                                  in zip(ids, prompts, params, strict=True)])
        self._next_id += len(ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]


def _as_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                    and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)
