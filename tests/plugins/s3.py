"""A real S3 API for tests: fixtures over :mod:`sandbox.stacks`' moto server on a free port.

Fixtures: ``moto_server`` (session), ``aws_credentials``, ``s3_bucket``, ``s3_storage_url``,
``s3_settings``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sandbox.stacks import S3_DUMMY_CREDENTIALS, MotoServer, start_moto_server


def unique_bucket_name() -> str:
    return f"ingest-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    process, endpoint_url = start_moto_server()
    server = MotoServer(process=process, endpoint_url=endpoint_url)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy AWS credentials, so no test can reach a real account (or need one)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in S3_DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return dict(S3_DUMMY_CREDENTIALS)


@pytest.fixture
def s3_bucket(moto_server: MotoServer, aws_credentials: dict[str, str]) -> str:
    """A fresh bucket on the shared moto server, so tests never see each other's objects."""
    bucket = unique_bucket_name()
    moto_server.create_bucket(bucket)
    return bucket


@pytest.fixture
def s3_storage_url(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/media"


@pytest.fixture
def s3_settings(make_settings: Any, moto_server: MotoServer, s3_storage_url: str) -> Any:
    """Settings whose storage is the moto server (other overrides via ``make_settings``)."""
    return make_settings(storage_url=s3_storage_url, s3_endpoint_url=moto_server.endpoint_url)
