"""Flower, pointed at pagedq's broker: loopback by default, basic auth when a password is set."""

from __future__ import annotations

import ipaddress
import os

from worker.celery_app import create_app
from worker.settings import ENV_PREFIX, Settings, SettingsError


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_environment(settings: Settings) -> dict[str, str]:
    """The FLOWER_* variables for these settings (Flower reads its options from them)."""
    if settings.flower_password is not None:
        secret = settings.flower_password.get_secret_value()
        # Passed through the environment, not argv, to keep it out of `ps`.
        return {"FLOWER_BASIC_AUTH": f"{settings.flower_user}:{secret}"}
    if not _is_loopback(settings.flower_address):
        raise SettingsError(
            f"{ENV_PREFIX}FLOWER_PASSWORD must be set for Flower to listen on "
            f"{settings.flower_address!r}; without it Flower stays on 127.0.0.1"
        )
    # Only reachable from this machine: let its JSON API answer without login.
    return {"FLOWER_UNAUTHENTICATED_API": "true"}


def run_flower(settings: Settings) -> int | None:
    os.environ.update(flower_environment(settings))
    app = create_app(settings)
    return app.start(["flower", f"--address={settings.flower_address}",
                      f"--port={settings.flower_port}"])
