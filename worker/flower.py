"""Flower, pointed at pagedq's broker: loopback by default, always behind basic auth.

Without a login Flower's API would answer any origin (`Access-Control-Allow-Origin:
*`), so any web page the user opens could enqueue or revoke jobs; with basic
auth Flower sends no CORS header and refuses cross-site writes.

Flower knows jobs as Celery tasks. A job that expired or was cancelled ends a task that
did not raise, which Celery calls SUCCESS; Flower's task pages show such a task's
state as the job's (EXPIRED, CANCELLED), read from what the task returned.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
from typing import Any

from worker.celery_app import TASK_NAME, create_app
from worker.models import JobStatus
from worker.settings import ENV_PREFIX, Settings, SettingsError

# 32 bytes, 43 URL-safe characters: never a ',' or ':' that Flower would misread.
GENERATED_PASSWORD_BYTES = 32
# A job's task returns its status's value; Flower holds the repr of what a task returned.
SHOWN_STATES = {repr(status.value): status.value.upper()
                for status in (JobStatus.EXPIRED, JobStatus.CANCELLED)}


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_password(settings: Settings) -> str | None:
    """The configured password; None when Flower may run with a generated one."""
    if settings.flower_password is not None:
        return settings.flower_password.get_secret_value()
    if not _is_loopback(settings.flower_address):
        # A password printed to a log is fine for one user on loopback, not
        # for a service reachable by others.
        raise SettingsError(
            f"{ENV_PREFIX}FLOWER_PASSWORD must be set for Flower to listen on "
            f"{settings.flower_address!r}; without it Flower stays on 127.0.0.1"
        )
    return None


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def flower_environment(settings: Settings, password: str) -> dict[str, str]:
    """The FLOWER_* variables for these settings (Flower reads its options from them)."""
    # Passed through the environment, not argv, to keep it out of `ps`.
    return {"FLOWER_BASIC_AUTH": f"{settings.flower_user}:{password}"}


def show_job_status(task: Any) -> Any:
    """Flower's format_task hook (given a copy of each task its pages show): a job that
    ended without running to success shows its own state, not SUCCESS."""
    if task.name == TASK_NAME and task.state == "SUCCESS":
        task.state = SHOWN_STATES.get(task.result, task.state)
    return task


def run_flower(settings: Settings) -> int | None:
    import flower.options  # noqa: F401 -- defines Flower's options, format_task among them
    from tornado.options import options

    password = flower_password(settings)
    if password is None:
        password = generate_password()
        print(f"pagedq flower: log in as user {settings.flower_user!r} with password "
              f"{password!r} (generated for this run; set {ENV_PREFIX}FLOWER_PASSWORD "
              "for a fixed one)", file=sys.stderr, flush=True)
    os.environ.update(flower_environment(settings, password))
    options.format_task = show_job_status
    app = create_app(settings)
    return app.start(["flower", f"--address={settings.flower_address}",
                      f"--port={settings.flower_port}"])
