"""Throwaway stacks for end-to-end tests and benchmarks: a fresh PostgreSQL database, a key
prefix of its own on a shared Redis, a moto S3 server and a fresh bucket, and the ``INGEST_*``
variables that join them (run the processes with :mod:`sandbox.processes`).

- :func:`embedded_stack_env`: the embedded defaults (SQLite file, ``sqla+sqlite`` broker,
  local files) under one temporary ``var`` directory;
- :func:`service_stack_env`: a fresh database on a PostgreSQL server, a prefix on a Redis and
  a fresh bucket on a moto server (:func:`start_moto_server`).

Other people use the same PostgreSQL and Redis at the same time: every name is unique and
Redis keys live under a prefix per stack (see :class:`RedisKeyspace`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from ingest.secrets import generate_key
from ingest.settings import Settings
from sandbox.processes import free_port, start_process, stop_group
from sandbox.server import media_hosts_for

# moto accepts any credentials; these keep every child away from a real AWS account.
S3_DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_MOTO_START_TIMEOUT_SECONDS = 30.0
_MOTO_START_ATTEMPTS = 3


# --- a moto S3 server ------------------------------------------------------------------


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


def _wait_until_answering(process: subprocess.Popen[bytes], endpoint_url: str) -> bool:
    deadline = time.monotonic() + _MOTO_START_TIMEOUT_SECONDS
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
    for _ in range(_MOTO_START_ATTEMPTS):
        port = free_port()
        endpoint_url = f"http://127.0.0.1:{port}"
        process = start_process(
            "moto",
            [str(executable), "-H", "127.0.0.1", "-p", str(port)],
            None,
            {**os.environ, **S3_DUMMY_CREDENTIALS},
        ).popen
        if _wait_until_answering(process, endpoint_url):
            return process, endpoint_url
        stop_moto_server(process)
    raise RuntimeError(f"moto_server did not start after {_MOTO_START_ATTEMPTS} attempts")


def stop_moto_server(process: subprocess.Popen[bytes]) -> None:
    stop_group(process)


def admin_client(endpoint_url: str) -> Any:
    """A boto3 S3 client for the server (dummy credentials; the server does not check them)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=S3_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def create_bucket(endpoint_url: str, bucket: str) -> None:
    client = admin_client(endpoint_url)
    try:
        client.create_bucket(Bucket=bucket)
    finally:
        client.close()


# --- stack environments -------------------------------------------------------------------


@dataclass
class StackEnv:
    """The ``INGEST_*`` variables one stack runs with, plus what the test needs to reach it."""

    env: dict[str, str]
    flavour: str  # "embedded" or "services"
    database_url: str
    storage_url: str
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def settings(self) -> Settings:
        """Settings for the test process itself, to read the stack's database and storage."""
        key = self.env.get("INGEST_SECRET_KEY")
        return Settings(
            var_dir=Path(self.env.get("INGEST_VAR_DIR", "var")),
            database_url=self.database_url,
            broker_url="memory://",
            storage_url=self.storage_url,
            s3_endpoint_url=self.env.get("INGEST_S3_ENDPOINT_URL"),
            secret_key=SecretStr(key) if key is not None else None,
        )

    def close(self) -> None:
        for step in reversed(self.cleanup):
            step()
        self.cleanup.clear()


def embedded_stack_env(root: Path, **extra: str) -> StackEnv:
    """Embedded defaults (SQLite, SQLite broker, local files) under ``root/var``, migrated."""
    from ingest import migrate

    var = root / "var"
    var.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{var / 'ingest.sqlite3'}"
    migrate.upgrade(database_url)
    env = {
        "INGEST_VAR_DIR": str(var),
        # The sandbox's address and port, when the caller names it (an entry without a
        # port allows only 80/443); a caller that starts one later sets its own.
        "INGEST_MEDIA_HOSTS": ",".join(
            media_hosts_for(extra.get("INGEST_GRAPH_URL", "http://127.0.0.1"))
        ),
        "INGEST_LOG_LEVEL": "INFO",
        **extra,
    }
    return StackEnv(
        env=env,
        flavour="embedded",
        database_url=database_url,
        storage_url=(var / "media").as_uri(),
    )


class RedisKeyspace:
    """A key prefix of its own on a shared Redis, so parallel runs never share queues.

    Celery's queue names are fixed; ``INGEST_BROKER_PREFIX`` (kombu's ``global_keyprefix``)
    and ``INGEST_REDIS_PREFIX`` put every key of one stack under one unique prefix, and
    :meth:`release` deletes them, so no stale wake-up survives for anyone else.
    """

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self.prefix = f"ingest-e2e-{uuid.uuid4().hex[:12]}"

    def env(self) -> dict[str, str]:
        return {"INGEST_BROKER_PREFIX": self.prefix, "INGEST_REDIS_PREFIX": self.prefix}

    def release(self) -> None:
        import redis

        client = redis.Redis.from_url(self._redis_url)
        try:
            for key in client.scan_iter(f"{self.prefix}*", count=1000):
                client.delete(key)
        finally:
            client.close()


def create_postgres_database(server_url: str) -> tuple[str, Callable[[], None]]:
    """A fresh, migrated database on ``server_url``'s server; returns its URL and a dropper."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from ingest import migrate
    from ingest.db import make_engine

    server = make_url(server_url)
    name = f"ingest_e2e_{uuid.uuid4().hex[:10]}"
    admin = make_engine(server.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def service_stack_env(
    database_server_url: str,
    redis_url: str,
    s3_endpoint_url: str,
    **extra: str,
) -> StackEnv:
    """PostgreSQL + Redis (broker and shared counters) + S3 on a moto server."""
    stack = StackEnv(env={}, flavour="services", database_url="", storage_url="")
    try:
        database_url, drop = create_postgres_database(database_server_url)
        stack.cleanup.append(drop)
        keyspace = RedisKeyspace(redis_url)
        stack.cleanup.append(keyspace.release)
        bucket = f"ingest-e2e-{uuid.uuid4().hex[:16]}"
        create_bucket(s3_endpoint_url, bucket)
    except BaseException:
        stack.close()
        raise
    stack.database_url = database_url
    stack.storage_url = f"s3://{bucket}/media"
    stack.env = {
        "INGEST_DATABASE_URL": database_url,
        # A server database has no key file beside it: the stack's own key.
        "INGEST_SECRET_KEY": generate_key(),
        "INGEST_BROKER_URL": redis_url,
        "INGEST_REDIS_URL": redis_url,
        **keyspace.env(),
        "INGEST_STORAGE_URL": stack.storage_url,
        "INGEST_S3_ENDPOINT_URL": s3_endpoint_url,
        "INGEST_MEDIA_HOSTS": ",".join(
            media_hosts_for(extra.get("INGEST_GRAPH_URL", "http://127.0.0.1"))
        ),
        "INGEST_LOG_LEVEL": "INFO",
        **S3_DUMMY_CREDENTIALS,
        **extra,
    }
    return stack
