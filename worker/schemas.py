"""What a producer may ask for, validated before anything is written or enqueued.

The sampling fields are not written down here: `GenerationParams` is built
from the engine's `SamplingParams` (names, types, defaults) and checked by
constructing one, so a job the producer accepts is a job the worker can run.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import warnings
from typing import Any, Literal, Self, get_args, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from engine import BeamSearchParams, RequestOutputKind, SamplingParams


class QueueKind(enum.StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class InvalidJob(ValueError):
    """A job was rejected before being stored or enqueued; the message names the fields."""


class IdempotencyConflict(InvalidJob):
    """An idempotency key already names a job that asked for something else."""


class _BrokenRule(ValueError):
    """An engine rule a sampling field breaks; `field` is the field it names."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_SAMPLING = {f.name for f in dataclasses.fields(SamplingParams)}
# Beam search's own job fields (beam_width, length_penalty, early_stopping); those it
# shares with sampling (max_tokens, stop_token_ids, ignore_eos) are the same fields.
_BEAM_ONLY = [f for f in dataclasses.fields(BeamSearchParams) if f.name not in _SAMPLING]
_BEAM_SHARED = [f.name for f in dataclasses.fields(BeamSearchParams) if f.name in _SAMPLING]
_DEFAULTS = SamplingParams()


def engine_params(params: dict[str, Any],
                  output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
                  ) -> SamplingParams | BeamSearchParams:
    """The engine's parameters for a job's `params`: beam search when `beam_width` is set,
    else sampling. ValueError, its message starting with the field, for a bad value or a
    sampling knob given to beam search."""
    data = dict(params)
    beam = {f.name: data.pop(f.name) for f in _BEAM_ONLY if f.name in data}
    width = beam.pop("beam_width", None)
    if width is None:
        for f in _BEAM_ONLY:
            if f.name in beam and beam[f.name] != f.default:
                raise ValueError(f"{f.name} applies to beam search (set beam_width), "
                                 f"got {beam[f.name]!r}")
        return SamplingParams(**data, output_kind=output_kind)
    sampling = SamplingParams(**data)  # the shared fields' rules, and the values normalised
    for name in (f.name for f in dataclasses.fields(SamplingParams)):
        if name in _BEAM_SHARED:
            continue
        value = getattr(sampling, name)
        if value == getattr(_DEFAULTS, name) or (name == "temperature" and value == 0):
            continue
        if name == "n":
            raise ValueError(f"n must be 1 with beam_width (the beams are the outputs), "
                             f"got {value!r}")
        if name == "temperature":
            raise ValueError(f"temperature must be 0 or unset with beam_width (beam search "
                             f"is deterministic), got {value!r}")
        raise ValueError(f"{name} is not used by beam search (beam_width), got {value!r}")
    return BeamSearchParams(beam_width=width, **beam,
                            **{name: getattr(sampling, name) for name in _BEAM_SHARED})


def _field_spec(field: dataclasses.Field[Any], annotation: Any) -> tuple[Any, Any]:
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return annotation | None, None  # beam_width: None is sampling
    if field.default_factory is not dataclasses.MISSING:
        # Lists (stop, stop_token_ids) may also be given as null, as the engine allows.
        return annotation | None, Field(default_factory=field.default_factory)
    nested = [t for t in get_args(annotation) if dataclasses.is_dataclass(t)]
    if nested:  # an optional group of fields (structured_outputs): a nested object
        return _fields_model(nested[0]) | None, field.default
    return annotation, field.default


def _fields_model(cls: type) -> type[BaseModel]:
    """A dataclass's fields as a pydantic model with its names, types and defaults; its
    rules are checked where the outer engine object is built from it."""
    hints = get_type_hints(cls)
    with warnings.catch_warnings():
        # `json` (a schema) shadows BaseModel's deprecated json() method: harmless here.
        warnings.filterwarnings("ignore", "Field name .* shadows an attribute", UserWarning)
        return create_model(
            cls.__name__,
            __config__=ConfigDict(extra="forbid", frozen=True),
            **{f.name: _field_spec(f, hints[f.name]) for f in dataclasses.fields(cls)},
        )


class _EngineChecked(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _engine_rules(self) -> Self:
        try:
            params = engine_params(self.model_dump())
            if getattr(params, "structured_outputs", None) is not None:
                # The engine's parser, as add_request runs it (well under a millisecond);
                # only a job that asks for a structure imports xgrammar, and torch with it.
                from engine.structured_output import parse_spec

                parse_spec(params.structured_outputs)
        except ValueError as exc:
            message = str(exc)
            name = message.split(" ", 1)[0]  # "max_tokens", "structured_outputs.json", ...
            known = name.split(".", 1)[0] in type(self).model_fields
            raise _BrokenRule(name if known else "", message) from None
        return self


GenerationParams = create_model(
    "GenerationParams",
    __base__=_EngineChecked,
    __doc__="The fields of engine.SamplingParams and engine.BeamSearchParams, with their "
            "names, defaults and rules.",
    **{f.name: _field_spec(f, get_type_hints(SamplingParams)[f.name])
       for f in dataclasses.fields(SamplingParams) if f.metadata.get("job_field", True)},
    **{f.name: _field_spec(f, get_type_hints(BeamSearchParams)[f.name]) for f in _BEAM_ONLY},
)


# PostgreSQL stores neither NUL in text nor a lone surrogate (not encodable as UTF-8).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(text: str) -> str | None:
    """What in `text` the database cannot store, said for an error message; None: fine."""
    bad = UNSTORABLE.search(text)
    if bad is None:
        return None
    char = bad.group()
    what = "a NUL character" if char == "\x00" else "a lone surrogate"
    return f"contains {what} (\\u{ord(char):04x})"


def _check_text(text: str, field: str = "") -> None:
    """`field`: the path to name when the caller's own location does not."""
    if (problem := unstorable(text)) is not None:
        raise _BrokenRule(field, problem)


class ChatMessage(BaseModel):
    """One message of a chat job, in OpenAI's shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _storable_content(cls, content: str) -> str:
        _check_text(content)
        return content


class JobRequest(BaseModel):
    """One generation job as a producer submits it: a prompt, or chat messages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | list[int] | None = None
    # Rendered with the model's chat template and its generation prompt.
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    params: GenerationParams = GenerationParams()  # type: ignore[valid-type]
    # Lower runs sooner, as in the engine's scheduler.
    priority: int = Field(0, ge=0, le=9)
    queue: QueueKind = QueueKind.INTERACTIVE
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    # Seconds of generation allowed once a worker starts the job; the worker
    # also caps it at its own PAGEDQ_JOB_DEADLINE_S.
    deadline_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Not started within this many seconds of submission, the job ends expired
    # without running (its caller has given up by then).
    ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Wrap the prompt as one user message in the model's chat template.
    chat: bool = False
    # Stream the text as it is generated (Client.stream); every job can be read once
    # it ends, streamed or not.
    stream: bool = False
    # The producer's own name for the job (a batch line's custom_id, a document's id).
    custom_id: str | None = Field(None, max_length=255)

    @field_validator("prompt")
    @classmethod
    def _storable_prompt(cls, prompt: str | list[int] | None) -> str | list[int] | None:
        if prompt is None:
            return None
        if not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, str):
            _check_text(prompt)
        elif not all(0 <= t < 2**31 for t in prompt):
            raise ValueError("token ids must be in [0, 2**31)")
        return prompt

    @field_validator("idempotency_key", "custom_id")
    @classmethod
    def _storable_key(cls, key: str | None) -> str | None:
        if key is not None:
            _check_text(key)
        return key

    @model_validator(mode="after")
    def _storable_stops(self) -> Self:
        for stop in self.params.stop or ():
            _check_text(stop, "params.stop")
        if (self.prompt is None) == (self.messages is None):
            raise _BrokenRule("prompt", "give a prompt or messages, not both nor neither")
        if self.messages is not None and self.chat:
            raise _BrokenRule("chat", "applies to a prompt; messages always use the chat "
                                      "template")
        if self.chat and not isinstance(self.prompt, str):
            raise ValueError("chat needs a text prompt, not token ids")
        return self

    def fingerprint(self) -> str:
        """What the job computes, hashed: the same prompt, params and chat flag
        give the same output whatever the queue, priority or deadline."""
        work = [self.prompt, self.params.model_dump(), self.chat]
        if self.messages is not None:
            work.append([m.model_dump() for m in self.messages])
        return hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()


def describe(exc: ValidationError) -> str:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        cause = error.get("ctx", {}).get("error")
        message = error["msg"]
        if isinstance(cause, _BrokenRule):
            loc += [cause.field] if cause.field else []
            message = str(cause)
        lines.append(f"{'.'.join(loc) or 'job'}: {message}")
    return "; ".join(lines)


def parse_job(data: JobRequest | dict[str, Any]) -> JobRequest:
    if isinstance(data, JobRequest):
        return data
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(describe(exc)) from None
