"""A real S3 API for tests and benchmarks: a moto server process on a free port.

Fixtures: ``moto_server`` (session), ``aws_credentials``, ``s3_bucket``, ``s3_storage_url``,
``s3_settings``. Benchmarks and scripts use :func:`start_moto_server` /
:func:`stop_moto_server` directly; nothing here imports ``ingest``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_START_TIMEOUT_SECONDS = 30.0
_START_ATTEMPTS = 3


@dataclass
class MotoServer:
    process: subprocess.Popen[bytes]
    endpoint_url: str
    _client: Any = None

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket``; one admin client per server, since building one is slow."""
        if self._client is None:
            self._client = admin_client(self.endpoint_url)
        self._client.create_bucket(Bucket=bucket)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        stop_moto_server(self.process)


def moto_server_executable() -> Path:
    """The venv's ``moto_server``, next to the running interpreter."""
    return Path(sys.executable).parent / "moto_server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_answering(process: subprocess.Popen[bytes], endpoint_url: str) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            httpx.get(f"{endpoint_url}/moto-api/", timeout=1.0)
            return True
        except httpx.TransportError:
            time.sleep(0.05)
    return False


def start_moto_server() -> tuple[subprocess.Popen[bytes], str]:
    """Start ``moto_server`` on a free local port; return the process and its endpoint URL.

    The port is found free and then handed to the server, so another process may take it
    in between: a server that does not come up is retried on a new port.
    """
    executable = moto_server_executable()
    if not executable.exists():
        raise RuntimeError(f"{executable} not found: install the dev extras (moto[server])")
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        endpoint_url = f"http://127.0.0.1:{port}"
        process = subprocess.Popen(
            [str(executable), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **DUMMY_CREDENTIALS},
        )
        if _wait_until_answering(process, endpoint_url):
            return process, endpoint_url
        stop_moto_server(process)
    raise RuntimeError(f"moto_server did not start after {_START_ATTEMPTS} attempts")


def stop_moto_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def admin_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for the server (dummy credentials; the server does not check them)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


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
    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return dict(DUMMY_CREDENTIALS)


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
