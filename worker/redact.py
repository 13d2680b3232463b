"""Broker and database URLs made fit for messages and logs: passwords hidden."""

from __future__ import annotations

import re

MASK = "***"
_DELIMITER = re.compile(r"[/?#]")
# SQLAlchemy hands query parameters to the driver, and psycopg takes a password there.
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` with the password of its `user:password@` part (and of a
    `password=` query parameter) replaced by ***."""
    return _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", _mask_userinfo(url))


def _mask_userinfo(url: str) -> str:
    # No URL parser is trusted to find the password: SQLAlchemy lets one
    # contain '/' and urllib lets one contain '@', so the part masked runs to
    # the last '@' before the path, which covers both readings.
    head, sep, rest = url.partition("://")
    if not sep:  # not a URL at all; still mask a "user:password@" inside it
        head, rest = "", url
    first_at = rest.find("@")
    if first_at < 0:
        return url
    path = _DELIMITER.search(rest, first_at)
    at = rest.rindex("@", 0, path.start() if path else len(rest))
    user, colon, password = rest[:at].partition(":")
    # A '/' before the colon means a path (sqlite:////a:b@c), not a user.
    if not colon or not password or "/" in user:
        return url
    return f"{head}{sep}{user}:{MASK}@{rest[at + 1:]}"
