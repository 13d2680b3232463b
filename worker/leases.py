"""The leases of the jobs a worker runs, renewed together while its engine loop lives.

A claim holds its job for `lease_s` seconds. Every third of that, one UPDATE
extends the leases of all the jobs this worker still runs, but only while
the engine loop shows signs of life: a worker whose loop hangs or died stops
renewing, its leases run out, and the sweep hands the jobs to another worker.
A lease found lost (a frozen worker woke up after the job was taken over)
has its request aborted here, so the stale attempt stops computing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from worker.db import is_transient
from worker.store import JobStore

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, store: JobStore, lease_s: float, alive: Callable[[float], bool],
                 on_lost: Callable[[str, str], None]) -> None:
        """`alive(within_s)`: the engine loop went round in the last `within_s`
        seconds. `on_lost(job_id, lease_id)`: that attempt no longer owns its job."""
        self.store = store
        self.lease_s = lease_s
        self._alive = alive
        self._on_lost = on_lost
        self._held: dict[str, str] = {}  # lease id -> job id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedq-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def hold(self, job_id: str, lease_id: str) -> None:
        with self._lock:
            self._held[lease_id] = job_id

    def drop(self, lease_id: str) -> None:
        with self._lock:
            self._held.pop(lease_id, None)

    def renew(self) -> None:
        """Extend every held lease now; abort the attempts whose lease is gone."""
        with self._lock:
            held = dict(self._held)
        lost = self.store.renew(list(held), self.lease_s)
        for lease_id in lost:
            with self._lock:
                job_id = self._held.pop(lease_id, None)
            if job_id is not None:  # not finished in the meantime
                log.warning("job %s: lease lost (taken over after it expired); aborting "
                            "this worker's attempt", job_id)
                self._on_lost(job_id, lease_id)

    def _run(self) -> None:
        interval = self.lease_s / 3
        while not self._stop.wait(interval):
            if not self._alive(interval * 2):
                log.error("the engine loop has not gone round for %.0f s; leases are left "
                          "to expire", interval * 2)
                continue
            try:
                self.renew()
            except Exception as exc:
                # The next round tries again; two misses in a row lose the leases.
                log.warning("lease renewal failed: %r", exc, exc_info=not is_transient(exc))
