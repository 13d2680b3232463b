"""Structured output with xgrammar: specs compiled against the model's tokenizer, one
grammar matcher per constrained sequence, and the token masks a step samples under.

A spec is parsed (JSON schema, regex or EBNF into an xgrammar `Grammar`) synchronously
at `add_request`, so an invalid one is a ValueError naming the field there; parsing
takes about a millisecond and happens once per distinct spec. Compiling the parsed
grammar against the vocabulary (the token-mask cache: the part that grows with the
vocabulary and the grammar) runs on a background thread, so unconstrained requests
never wait for it; the scheduler admits a constrained request only once its grammar is
ready. Compiled grammars are kept in an LRU cache, one per distinct spec.

xgrammar is imported on the first constrained request, which also reads the tokenizer's
vocabulary into xgrammar (about 0.4 s for SmolLM2, once): an engine that serves no
constrained request never loads it.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar
    from transformers import PreTrainedTokenizerBase

CACHE_SIZE = 128  # compiled grammars kept
_COMPILE_THREADS = 2
# xgrammar's C++ errors start with a log prefix: "[19:35:48] /project/cpp/x.cc:94: ".
_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


class Grammar:
    """A request's compiled grammar, possibly still compiling: the scheduler admits the
    request once `ready`, and gives each of its sequences a matcher."""

    def __init__(self, future: Future[xgrammar.CompiledGrammar]) -> None:
        self._future = future

    @property
    def ready(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float) -> None:
        """Return when compiled (or failed), or after `timeout` seconds."""
        wait([self._future], timeout)

    def error(self) -> str | None:
        """Why compiling failed (the request cannot run), or None."""
        exc = self._future.exception()
        return None if exc is None else f"structured_outputs: compiling failed: {exc}"

    def new_matcher(self) -> xgrammar.GrammarMatcher:
        import xgrammar

        return xgrammar.GrammarMatcher(self._future.result())


@dataclass(slots=True)
class TokenMasks:
    """The tokens the grammar allows for some rows of a step: bit j of `bitmask[i]`
    (32 tokens per int32 word) is set when token j may follow in row `rows[i]`."""

    rows: list[int]
    bitmask: torch.Tensor


class StructuredOutputManager:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int,
                 eos_token_ids: set[int], model_path: Path) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.model_path = model_path
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[tuple, Future[xgrammar.CompiledGrammar]] = OrderedDict()

    def prepare(self, spec: StructuredOutputsParams) -> Grammar:
        """The grammar of `spec`, compiled or compiling; ValueError naming the field when
        the spec is invalid or the model has no tokenizer. Changes nothing but the cache."""
        key = _cache_key(spec)
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return Grammar(future)
        if self.tokenizer is None:
            raise ValueError(f"structured_outputs needs a tokenizer, and checkpoint "
                             f"{self.model_path} has none")
        compiler = self._get_compiler()
        parsed = parse_spec(spec)
        future = self._executor.submit(compiler.compile_grammar, parsed)
        self._cache[key] = future
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)  # requests holding it keep their reference
        return Grammar(future)

    def _get_compiler(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size,
                stop_token_ids=sorted(self.eos_token_ids) or None)
            # Our cache holds the compiled grammars; xgrammar's would be a second copy.
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=_COMPILE_THREADS,
                                                      cache_enabled=False)
            self._executor = ThreadPoolExecutor(_COMPILE_THREADS,
                                                thread_name_prefix="grammar-compile")
        return self._compiler


def _cache_key(spec: StructuredOutputsParams) -> tuple:
    kind = spec.kind
    value = getattr(spec, kind)
    if kind == "json":
        value = json.dumps(json.loads(value) if isinstance(value, str) else value,
                           sort_keys=True)
        return kind, value, spec.any_whitespace
    if kind == "json_object":
        return kind, spec.any_whitespace
    if kind == "choice":
        value = tuple(value)
    return kind, value


def parse_spec(spec: StructuredOutputsParams) -> xgrammar.Grammar:
    """`spec` as an xgrammar Grammar, not yet compiled against the vocabulary; ValueError
    naming the field when xgrammar rejects it."""
    import xgrammar

    kind = spec.kind
    try:
        if kind == "json":
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            return xgrammar.Grammar.from_json_schema(schema,
                                                     any_whitespace=spec.any_whitespace)
        if kind == "json_object":
            return xgrammar.Grammar.from_json_schema(
                '{"type": "object"}', any_whitespace=spec.any_whitespace)
        if kind == "regex":
            return xgrammar.Grammar.from_regex(spec.regex)
        if kind == "choice":
            # EBNF string literals take JSON's escapes.
            return xgrammar.Grammar.from_ebnf("root ::= " + " | ".join(
                json.dumps(c, ensure_ascii=False) for c in spec.choice))
        return xgrammar.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as exc:
        what = {"json": "a valid JSON schema", "regex": "a valid regex",
                "grammar": "a valid EBNF grammar"}.get(kind, "valid")
        message = _LOG_PREFIX.sub("", str(exc)).strip()
        raise ValueError(f"structured_outputs.{kind} is not {what}: {message}") from None


def fill_token_masks(matchers: list[xgrammar.GrammarMatcher | None], vocab_size: int
                     ) -> TokenMasks | None:
    """The masks of the rows that have a grammar matcher, or None when no row has one.
    Filling a mask reads the matcher and changes nothing."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return None
    bitmask = torch.full((len(rows), -(-vocab_size // 32)), -1, dtype=torch.int32)
    for i, row in enumerate(rows):
        matchers[row].fill_next_token_bitmask(bitmask, i)
    return TokenMasks(rows, bitmask)


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks, rows: list[int]) -> None:
    """Set to -inf, in place, each masked row's logits of the tokens its grammar forbids:
    `rows[i]` is the row of `logits` (float32, [rows, vocab]) that `masks.rows[i]` names."""
    import xgrammar

    bitmask = torch.full((logits.shape[0], masks.bitmask.shape[1]), -1, dtype=torch.int32)
    bitmask[rows] = masks.bitmask
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device),
                                         vocab_size=logits.shape[-1], indices=rows)
