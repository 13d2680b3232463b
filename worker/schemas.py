"""What a producer may ask for, validated before anything is written or enqueued."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class QueueKind(enum.StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class GenerationParams(BaseModel):
    """The sampling fields of engine.SamplingParams, with the same names and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, le=64)
    temperature: float = Field(1.0, ge=0.0)
    top_k: int = Field(0, ge=-1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    stop: list[Annotated[str, Field(min_length=1)]] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _min_below_max(self) -> Self:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class JobRequest(BaseModel):
    """One generation job as a producer submits it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | list[int]
    params: GenerationParams = GenerationParams()
    # Lower runs sooner, as in the engine's scheduler.
    priority: int = Field(0, ge=0, le=9)
    queue: QueueKind = QueueKind.INTERACTIVE
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    # Seconds of generation allowed once a worker starts the job; the worker
    # also caps it at its own PAGEDQ_JOB_DEADLINE_S.
    deadline_s: float | None = Field(None, gt=0)
    # Wrap the prompt as one user message in the model's chat template.
    chat: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty_prompt(cls, prompt: str | list[int]) -> str | list[int]:
        if not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and min(prompt) < 0:
            raise ValueError("token ids must not be negative")
        if isinstance(prompt, str) and "\x00" in prompt:
            raise ValueError("NUL characters cannot be stored; pass token ids instead")
        return prompt

    @model_validator(mode="after")
    def _text_prompt_for_chat(self) -> Self:
        if self.chat and not isinstance(self.prompt, str):
            raise ValueError("chat needs a text prompt, not token ids")
        return self


class InvalidJob(ValueError):
    """A job was rejected before being stored or enqueued; the message names the fields."""


def describe(exc: ValidationError) -> str:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "job"
        lines.append(f"{field}: {error['msg']}")
    return "; ".join(lines)


def parse_job(data: JobRequest | dict[str, Any]) -> JobRequest:
    if isinstance(data, JobRequest):
        return data
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(describe(exc)) from None
