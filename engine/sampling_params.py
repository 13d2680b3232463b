"""What a request asks for: sampling knobs and beam search knobs, validated on creation."""

from dataclasses import dataclass, field


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(self.n >= 1, "n", "must be >= 1", self.n)
        _check(self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive count", self.top_k)
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0",
               self.repetition_penalty)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]",
               self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]",
               self.frequency_penalty)
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1", self.max_tokens)
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               "must be in [0, max_tokens]", self.min_tokens)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must hold non-empty strings", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "must hold token ids >= 0", self.stop_token_ids)
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0",
               self.logprobs)
        # Greedy samples would all be the same sequence: n > 1 needs randomness.
        _check(self.n == 1 or self.temperature > 0, "n",
               "must be 1 when temperature is 0 (greedy samples would be identical)", self.n)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(self.beam_width >= 1, "beam_width", "must be >= 1", self.beam_width)
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1", self.max_tokens)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
