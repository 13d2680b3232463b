"""Passwords in broker and database URLs never reach a message."""

from __future__ import annotations

import pytest

from worker.celery_app import create_app
from worker.client import BrokerUnavailable, publish
from worker.redact import mask_url
from worker.schemas import QueueKind
from worker.settings import load_settings


@pytest.mark.parametrize("url, masked", [
    ("redis://:s3cretPW@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://default:s3cretPW@host:6379/0", "redis://default:***@host:6379/0"),
    ("rediss://:s3cretPW@host:6380/1?ssl_cert_reqs=required",
     "rediss://:***@host:6380/1?ssl_cert_reqs=required"),
    ("postgresql+psycopg://user:s3cretPW@host/db", "postgresql+psycopg://user:***@host/db"),
    ("amqp://guest:s3cretPW@[::1]:5672//", "amqp://guest:***@[::1]:5672//"),
    # Unencoded characters each parser reads differently: all of it is hidden.
    ("redis://:s3c@retPW@host/0", "redis://:***@host/0"),
    ("postgresql://user:s3c/retPW@host/db", "postgresql://user:***@host/db"),
    ("redis://:s3c?ret#PW@host/0", "redis://:***@host/0"),
    # An '@' after the host belongs to the path or query and stays.
    ("postgresql://user:s3cretPW@host/db?application_name=a@b",
     "postgresql://user:***@host/db?application_name=a@b"),
    # psycopg also takes the password as a query parameter.
    ("postgresql+psycopg://user@host/db?sslmode=require&password=s3cretPW&x=1",
     "postgresql+psycopg://user@host/db?sslmode=require&password=***&x=1"),
])
def test_mask_url_hides_the_password(url, masked):
    assert mask_url(url) == masked
    assert "s3c" not in mask_url(url)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "redis://user@host:6379/0",
    "redis://:@host:6379/0",
    "sqlite:///pagedq.db",
    "sqlite:////tmp/odd:name@here/jobs.db",
    "memory://",
    "",
])
def test_mask_url_leaves_a_url_without_password_alone(url):
    assert mask_url(url) == url


@pytest.mark.parametrize("text, masked", [
    ("user:s3cretPW@host:port", "user:***@host:port"),
    ("redis://:s3cretPW@host:notaport/x", "redis://:***@host:notaport/x"),
    ("not a url, user:s3cretPW@host", "not a url, user:***@host"),
])
def test_mask_url_masks_what_it_cannot_parse(text, masked):
    assert mask_url(text) == masked


def test_an_unreachable_broker_is_reported_without_its_password():
    app = create_app(load_settings(broker_url="redis://:s3cretPW@127.0.0.1:1/0"))
    try:
        with pytest.raises(BrokerUnavailable) as refused:
            publish(app, [("job-1", QueueKind.INTERACTIVE)])
    finally:
        app.close()
    message = str(refused.value)
    assert "s3cretPW" not in message
    assert "redis://:***@127.0.0.1:1/0" in message
    assert refused.value.unsent == ["job-1"]
