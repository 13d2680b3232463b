"""All configuration of the worker side, read from `PAGEDQ_*` environment variables.

The engine knobs are not written down here: `Settings` takes the fields of
`engine.EngineConfig` (names, types, defaults) and checks them by constructing
one, so every knob is settable as `PAGEDQ_<NAME>` and a value the worker accepts
is one the engine accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self, get_type_hints

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine import EngineConfig

ENV_PREFIX = "PAGEDQ_"

# EngineConfig knobs a worker does not offer. share_blocks=False copies every block on
# fork, only to measure what sharing saves (bench/sharing.py); a worker would just
# hold fewer sequences with it.
_NOT_WORKER_KNOBS = frozenset({"share_blocks"})

# Engine knobs are passed to EngineConfig under these exact names.
ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig)
                      if f.name not in _NOT_WORKER_KNOBS)


class SettingsError(ValueError):
    """A `PAGEDQ_*` variable has a bad value; the message names the variable."""


class _WorkerSettings(BaseSettings):
    """The worker's own settings; `Settings` adds the engine's knobs to these."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Where jobs travel and where results land.
    broker_url: str = "redis://127.0.0.1:6379/0"
    # The embedded default is a SQLite file in the working directory, so that
    # `pagedq run` works with nothing else installed.
    database_url: str = "sqlite:///pagedq.db"

    # Queues: the worker always drains interactive before bulk.
    interactive_queue: str = Field("pagedq.interactive", min_length=1)
    bulk_queue: str = Field("pagedq.bulk", min_length=1)
    # Job slots of a worker (threads of its pool, less the interactive reserve);
    # None means max_num_seqs, so that every sequence slot of the engine can hold a job.
    worker_concurrency: int | None = Field(None, gt=0)
    # Threads a worker runs beyond its slots, which bulk jobs never hold: a worker
    # full of bulk jobs still takes this many interactive jobs at once, and the
    # engine preempts bulk work for them (see worker/reserve.py). An idle thread
    # costs next to nothing; a burst of more interactive jobs than this waits for
    # the first job of any kind to end.
    interactive_reserve: int = Field(8, ge=0)
    # Jobs submitted together travel this many to a Celery message: the message's
    # delivery, acknowledgement and events are paid once for all of them, and a
    # worker claims them in one transaction. A job alone is a message of its own.
    jobs_per_message: int = Field(32, gt=0)

    # Redis hands a message unacked for this long out again, even while its
    # worker is alive and running the job. A lease turns such a copy into a
    # cheap no-op, so this can be short: it is how soon a message that a killed
    # worker had taken, but not yet claimed in SQL, comes back.
    visibility_timeout_s: float = Field(60.0, gt=0)
    job_deadline_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, gt=0)
    # A claimed job belongs to its worker for this long, renewed while the
    # worker's engine loop lives; a worker killed with its jobs loses them to
    # another one about this long (plus a sweep interval) later.
    lease_s: float = Field(30.0, gt=0)
    # Size caps a producer enforces before anything is stored.
    max_prompt_chars: int = Field(1_000_000, gt=0)
    max_prompt_token_ids: int = Field(131_072, gt=0)
    max_stop: int = Field(64, gt=0)  # stop strings, and stop token ids, per job
    # Redis loses a message for good when its worker dies between taking it
    # and recording it as unacked, or when Redis restarts without persistence.
    # Workers therefore publish again the jobs still queued in SQL whose
    # message went out this long ago. Not shorter than the longest wait in a
    # backlog: each re-publish of a job still waiting its turn adds a message.
    republish_after_s: float = Field(3600.0, gt=0)
    # How often each worker looks for such jobs and for jobs whose lease
    # expired; None: half the lease, at most a tenth of republish_after_s.
    sweep_interval_s: float | None = Field(None, gt=0)

    # Streaming: a job's Redis Stream keeps at most this many entries (a reader that
    # falls further behind gets the rest from SQL at the end) and lives this long
    # after the job ends.
    stream_maxlen: int = Field(4096, gt=0)
    stream_ttl_s: float = Field(600.0, gt=0)
    # A worker serves its engine's Prometheus metrics on this port; None: not at all.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_address: str = "127.0.0.1"

    # The gateway (`pagedq serve`): the name /v1/models lists (default: the model's),
    # the largest upload, and how long a batch's "24h" completion window lasts.
    served_model_name: str | None = None
    max_file_bytes: int = Field(100 * 2**20, gt=0)
    batch_window_s: float = Field(24 * 3600.0, gt=0)
    # Jobs queued and unstarted beyond which the gateway answers 429; None: no limit.
    max_queued_jobs: int | None = Field(None, gt=0)

    flower_address: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=0, le=65535)
    flower_user: str = "admin"
    # None: `pagedq flower` makes up a password for each run and prints it.
    flower_password: SecretStr | None = None

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, url: str) -> str:
        # psycopg 3 is the installed driver; plain postgresql:// would ask
        # SQLAlchemy for psycopg2.
        for scheme in ("postgresql://", "postgres://"):
            if url.startswith(scheme):
                return "postgresql+psycopg://" + url[len(scheme):]
        return url

    # Flower splits its basic-auth setting at commas into "user:password"
    # pairs and compares a login as that one string: a comma would let a piece
    # of the password log in alone, a colon in the user would blur the pair.
    @field_validator("flower_user")
    @classmethod
    def _flower_user_fits_basic_auth(cls, user: str) -> str:
        if not user or ":" in user or "," in user:
            raise ValueError("must be non-empty and contain neither ':' nor ','")
        return user

    @field_validator("flower_password")
    @classmethod
    def _flower_password_fits_basic_auth(cls, password: SecretStr | None) -> SecretStr | None:
        if password is None:
            return None
        if not password.get_secret_value():
            raise ValueError("must not be empty; unset it to get a generated password")
        if "," in password.get_secret_value():
            raise ValueError("must not contain ',' (Flower would split the password there)")
        return password

    @model_validator(mode="after")
    def _engine_rules(self) -> Self:
        try:
            EngineConfig(**self.engine_kwargs())
        except ValueError as exc:
            # EngineConfig's messages start with the field they are about.
            message = str(exc)
            name = message.split(" ", 1)[0]
            if name in ENGINE_FIELDS:
                message = f"{ENV_PREFIX}{name.upper()}: {message}"
            raise SettingsError(message) from None
        return self

    @model_validator(mode="after")
    def _distinct_queues(self) -> Self:
        if self.interactive_queue == self.bulk_queue:
            raise ValueError(
                f"{ENV_PREFIX}INTERACTIVE_QUEUE and {ENV_PREFIX}BULK_QUEUE must differ"
            )
        return self

    @model_validator(mode="after")
    def _sweep_within_threshold(self) -> Self:
        if self.sweep_interval > self.republish_after_s:
            raise ValueError(
                f"{ENV_PREFIX}SWEEP_INTERVAL_S ({self.sweep_interval:g}) must not exceed "
                f"{ENV_PREFIX}REPUBLISH_AFTER_S ({self.republish_after_s:g}), or a job whose "
                "message was lost waits for a sweep long after it is due"
            )
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        """The EngineConfig fields, by name, as this worker sets them."""
        return {name: getattr(self, name) for name in ENGINE_FIELDS}

    @property
    def concurrency(self) -> int:
        return self.worker_concurrency or self.max_num_seqs

    @property
    def sweep_interval(self) -> float:
        """Seconds between two looks of a worker for jobs due a re-publish."""
        return self.sweep_interval_s or min(self.lease_s / 2, self.republish_after_s / 10)


_ENGINE_HINTS = get_type_hints(EngineConfig)

Settings = create_model(
    "Settings",
    __base__=_WorkerSettings,
    __doc__="The worker's settings and every knob of engine.EngineConfig, from PAGEDQ_*.",
    **{f.name: (_ENGINE_HINTS[f.name], f.default)
       for f in dataclasses.fields(EngineConfig) if f.name in ENGINE_FIELDS},
)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation error into one naming the variables."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            cause = error.get("ctx", {}).get("error")
            message = str(cause) if isinstance(cause, ValueError) else error["msg"]
            if error["loc"]:
                message = f"{ENV_PREFIX}{str(error['loc'][0]).upper()}: {message}"
            problems.append(message)
        raise SettingsError("bad configuration: " + "; ".join(problems)) from None
