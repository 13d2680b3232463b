"""A token's log-probability at one position: torch-free, so job records can use it."""

from dataclasses import dataclass


@dataclass(slots=True)
class Logprob:
    """A token's log-probability at one position, its rank there (1: the most likely)
    and its text (filled when the output is reported). `logprob` is None only where a
    stored -inf (a token a grammar ruled out) could not be kept."""

    logprob: float | None
    rank: int
    decoded_token: str | None = None
