"""`pagedq serve`'s application on a free port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from tests.worker.services import free_port
from worker.gateway.app import create_app
from worker.keys import KeyStore
from worker.settings import Settings


@contextmanager
def running_gateway(settings: Settings) -> Iterator[str]:
    """Serve the gateway for `settings` until the block ends; yields its base URL
    (".../v1" is where the OpenAI SDK points)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
            assert answer.status == 200
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def new_key(settings: Settings, name: str) -> str:
    """A fresh API key on the settings' database."""
    keys = KeyStore(settings.database_url)
    try:
        return keys.create(name)[1]
    finally:
        keys.close()
