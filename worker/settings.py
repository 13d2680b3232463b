"""All configuration of the worker side, read from `PAGEDQ_*` environment variables."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PAGEDQ_"

# Engine knobs are passed to EngineConfig under these exact names.
ENGINE_FIELDS = (
    "model", "dtype", "device", "block_size", "num_device_blocks", "swap_space_gib",
    "max_num_seqs", "max_num_batched_tokens", "max_model_len", "preemption_mode",
    "enable_prefix_caching", "attention_backend", "seed",
)


class SettingsError(ValueError):
    """A `PAGEDQ_*` variable has a bad value; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Where jobs travel and where results land.
    broker_url: str = "redis://127.0.0.1:6379/0"
    # The embedded default is a SQLite file in the working directory, so that
    # `pagedq run` works with nothing else installed.
    database_url: str = "sqlite:///pagedq.db"

    # Engine (the names and defaults of engine.EngineConfig).
    model: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    block_size: Literal[8, 16, 32, 64] = 16
    num_device_blocks: int | None = Field(None, gt=0)
    swap_space_gib: float = Field(4.0, ge=0)
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(4096, gt=0)
    max_model_len: int | None = Field(None, gt=0)
    preemption_mode: Literal["swap", "recompute"] = "swap"
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    seed: int = 0

    # Queues: the worker always drains interactive before bulk.
    interactive_queue: str = Field("pagedq.interactive", min_length=1)
    bulk_queue: str = Field("pagedq.bulk", min_length=1)
    # Threads of the worker pool; None means max_num_seqs, so that every
    # sequence slot of the engine can hold a job.
    worker_concurrency: int | None = Field(None, gt=0)

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
    def _distinct_queues(self) -> Settings:
        if self.interactive_queue == self.bulk_queue:
            raise ValueError(
                f"{ENV_PREFIX}INTERACTIVE_QUEUE and {ENV_PREFIX}BULK_QUEUE must differ"
            )
        return self

    @model_validator(mode="after")
    def _sweep_within_threshold(self) -> Settings:
        if self.sweep_interval > self.republish_after_s:
            raise ValueError(
                f"{ENV_PREFIX}SWEEP_INTERVAL_S ({self.sweep_interval:g}) must not exceed "
                f"{ENV_PREFIX}REPUBLISH_AFTER_S ({self.republish_after_s:g}), or a job whose "
                "message was lost waits for a sweep long after it is due"
            )
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ENGINE_FIELDS}

    @property
    def concurrency(self) -> int:
        return self.worker_concurrency or self.max_num_seqs

    @property
    def sweep_interval(self) -> float:
        """Seconds between two looks of a worker for jobs due a re-publish."""
        return self.sweep_interval_s or min(self.lease_s / 2, self.republish_after_s / 10)


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
