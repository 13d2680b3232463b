"""Gateway API keys: made once, stored as SHA-256 hashes, revoked by name."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from worker.db import make_engine, make_sessionmaker
from worker.models import ApiKey, utcnow

KEY_PREFIX = "pq-"
SHOWN_PREFIX = 10  # characters of a key kept in clear, to tell keys apart in a listing


class KeyProblem(ValueError):
    """A key name that is taken, unknown or unusable; the message says which."""


@dataclass(slots=True, frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.prefix, row.created_at, row.revoked_at)


class KeyStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url, pool_size=2)
        self._sessions = make_sessionmaker(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def create(self, name: str) -> tuple[KeyInfo, str]:
        """A new key named `name`; the key itself is returned once and never stored."""
        if not name or len(name) > 255 or not name.isprintable():
            raise KeyProblem(f"key name {name!r}: 1 to 255 printable characters")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(id="key_" + secrets.token_hex(12), name=name, key_hash=hash_key(key),
                     prefix=key[:SHOWN_PREFIX], created_at=utcnow())
        try:
            with self._sessions() as session, session.begin():
                session.add(row)
                session.flush()
                info = _info(row)
        except IntegrityError:
            raise KeyProblem(f"a key named {name!r} exists already") from None
        return info, key

    def list(self) -> list[KeyInfo]:
        with self._sessions() as session:
            return [_info(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.name))]

    def revoke(self, name: str) -> None:
        with self._sessions() as session, session.begin():
            done = session.execute(
                update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
                .execution_options(synchronize_session=False)).rowcount
        if not done:
            raise KeyProblem(f"no active key named {name!r}")

    def verify(self, key: str) -> KeyInfo | None:
        """The active key this is, or None."""
        with self._sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                                      ApiKey.revoked_at.is_(None)))
            return None if row is None else _info(row)
