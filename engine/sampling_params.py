"""What a request asks for: sampling knobs and beam search knobs, validated on creation.

These checks are the one definition of a valid request: the worker builds its
job schema by constructing a `SamplingParams`, so every rule lives in
`__post_init__` and raises a ValueError whose message starts with the field name.
What depends on the loaded model (vocabulary, batch limits) is checked by the engine.
"""

import enum
import json
import math
from dataclasses import dataclass, field, fields

MAX_LOGPROBS = 20
_SEED_RANGE = range(-2**63, 2**64)  # what torch.Generator.manual_seed accepts


class RequestOutputKind(enum.Enum):
    """What each step reports for a running request (vLLM's names)."""

    CUMULATIVE = "cumulative"  # everything generated so far, every step
    DELTA = "delta"            # only what is new since the last report
    FINAL_ONLY = "final_only"  # nothing until the request finishes, then everything


@dataclass(slots=True)
class StructuredOutputsParams:
    """Constrain the output to a structure (vLLM's names): exactly one of a JSON schema
    (`json`, a dict or its JSON text), any JSON object (`json_object=True`), a regular
    expression (`regex`), one of a list of strings (`choice`) or an EBNF grammar
    (`grammar`, as xgrammar reads it, with a `root` rule).

    JSON is generated without free whitespace between tokens unless `any_whitespace`
    (small models otherwise run on in newlines until `max_tokens`). Whether a schema,
    regex or grammar is valid is checked by the engine, which compiles it.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        name = "structured_outputs"
        _check(self.json is None or isinstance(self.json, dict | str), f"{name}.json",
               "must be a JSON schema (a dict or its JSON text)", self.json)
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"{name}.json is not valid JSON: {exc}") from None
            _check(isinstance(parsed, dict), f"{name}.json", "must be a JSON object",
                   self.json)
        _check(isinstance(self.json_object, bool), f"{name}.json_object", "must be a bool",
               self.json_object)
        _check(self.regex is None or (isinstance(self.regex, str) and self.regex),
               f"{name}.regex", "must be a non-empty str", self.regex)
        if self.choice is not None:
            self.choice = _as_list(self.choice, f"{name}.choice")
            _check(bool(self.choice) and all(isinstance(c, str) and c for c in self.choice),
                   f"{name}.choice", "must be a non-empty list of non-empty strings",
                   self.choice)
        _check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar),
               f"{name}.grammar", "must be a non-empty str", self.grammar)
        _check(isinstance(self.any_whitespace, bool), f"{name}.any_whitespace",
               "must be a bool", self.any_whitespace)
        kinds = [k for k in STRUCTURE_KINDS if getattr(self, k) not in (None, False)]
        _check(len(kinds) == 1, name, "must set exactly one of " + ", ".join(STRUCTURE_KINDS),
               kinds)

    @property
    def kind(self) -> str:
        """The one structure field that is set."""
        return next(k for k in STRUCTURE_KINDS if getattr(self, k) not in (None, False))


STRUCTURE_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling settings, with vLLM's names and meanings.

    `temperature=0` is greedy. `top_k` of 0 or -1 disables top-k. `logprobs=k`
    returns the log-probabilities of the k most likely tokens at each step
    beside the sampled one.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    # The same for each prompt token after the first (the first has no context).
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    # How the caller reads results, not what is generated: not a job field.
    output_kind: RequestOutputKind = field(default=RequestOutputKind.CUMULATIVE,
                                           metadata={"job_field": False})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids")
        if isinstance(self.structured_outputs, dict):  # as a job's JSON gives it
            self.structured_outputs = _structured_from_dict(self.structured_outputs)
        _check(self.structured_outputs is None
               or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "must be None or a StructuredOutputsParams",
               self.structured_outputs)
        _check_floats(self, "temperature", "top_p", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty")
        _check(_is_int(self.n) and self.n >= 1, "n", "must be an int >= 1", self.n)
        _check(self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k",
               "must be -1, 0 (off) or a positive count", self.top_k)
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0",
               self.repetition_penalty)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]",
               self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]",
               self.frequency_penalty)
        _check(self.seed is None or (_is_int(self.seed) and self.seed in _SEED_RANGE), "seed",
               "must be None or an int in [-2**63, 2**64)", self.seed)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               "must be an int >= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", "must be an int in [0, max_tokens]", self.min_tokens)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must hold non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must hold int token ids >= 0", self.stop_token_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a bool",
               self.ignore_eos)
        _check(self.logprobs is None or (_is_int(self.logprobs)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be None or an int in [0, {MAX_LOGPROBS}]", self.logprobs)
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               "prompt_logprobs", f"must be None or an int in [0, {MAX_LOGPROBS}]",
               self.prompt_logprobs)
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind",
               "must be a RequestOutputKind", self.output_kind)
        # Greedy samples would all be the same sequence: n > 1 needs randomness.
        _check(self.n == 1 or self.temperature > 0, "n",
               "must be 1 when temperature is 0 (greedy samples would be identical)", self.n)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_incremental_text(self) -> bool:
        """Whether text must be decoded as tokens arrive: to match stop strings, or to
        report it before the end. Otherwise it is decoded once, when the request ends."""
        return bool(self.stop) or self.output_kind is not RequestOutputKind.FINAL_ONLY


@dataclass(slots=True)
class BeamSearchParams:
    """Beam search with Transformers' scoring: sum of logprobs / length ** length_penalty."""

    beam_width: int
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids")
        _check(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width",
               "must be an int >= 1", self.beam_width)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               "must be an int >= 1", self.max_tokens)
        _check_floats(self, "length_penalty")
        _check(isinstance(self.early_stopping, bool), "early_stopping", "must be a bool",
               self.early_stopping)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must hold int token ids >= 0", self.stop_token_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a bool",
               self.ignore_eos)


def _structured_from_dict(data: dict) -> StructuredOutputsParams:
    known = {f.name for f in fields(StructuredOutputsParams)}
    unknown = sorted(map(str, set(data) - known))
    _check(not unknown, "structured_outputs", "has unknown fields", unknown)
    return StructuredOutputsParams(**data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is neither inf nor nan and fits a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the range of a float
        return False


def _check_floats(params: object, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        _check(is_finite_number(value), name, "must be a finite number", value)


def _as_list(value: object, name: str) -> list:
    if value is None:
        return []
    _check(isinstance(value, list | tuple), name, "must be a list", value)
    return list(value)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
