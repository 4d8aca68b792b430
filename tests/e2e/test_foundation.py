"""The three process types start from the CLI, answer their probes, and share one registry."""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import select

from ingest.accounts import hash_secret
from ingest.db import make_engine, make_session_factory
from ingest.models import ApiToken, Instance
from sandbox.processes import ProcessGroup
from sandbox.stacks import StackEnv

pytestmark = pytest.mark.e2e


def test_web_worker_and_beat_start_and_report_ready(
    stack: StackEnv, stack_processes: ProcessGroup
) -> None:
    stack_processes.env = stack.env
    web = stack_processes.web()
    worker = stack_processes.worker(concurrency=2)
    beat = stack_processes.beat()

    health = httpx.get(f"{web.base_url}/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}

    ready = httpx.get(f"{web.base_url}/readyz", timeout=10)
    body = ready.json()
    assert ready.status_code == 200, body
    assert body["status"] == "ok"
    assert {"database", "broker", "storage"} <= set(body["checks"])
    assert all(value == "ok" for value in body["checks"].values())
    if stack.flavour == "services":
        assert body["checks"]["redis"] == "ok"

    assert worker.alive() and beat.alive()

    # The handshake's query carries the verify token: the access log shows the path only.
    httpx.get(
        f"{web.base_url}/webhook",
        params={"hub.mode": "subscribe", "hub.verify_token": "tok-SECRET", "hub.challenge": "1"},
        timeout=5,
    )
    deadline = time.monotonic() + 10  # gunicorn writes the line after the response
    while '"GET /webhook HTTP/1.1" 403' not in web.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"GET /webhook HTTP/1.1" 403' in web.log()
    assert "tok-SECRET" not in web.log()


def test_registry_commands_reach_the_stack_database(
    stack: StackEnv, stack_processes: ProcessGroup
) -> None:
    stack_processes.env = stack.env
    stack_processes.run(
        "instance",
        "add",
        "shop",
        "--provider",
        "cloud",
        "--phone-number-id",
        "5550001",
        "--api-key",
        "key-1",
        "--app-secret",
        "s3cret",
    )
    result = stack_processes.run("token", "create", "--instance", "shop")
    token = result.stdout.strip().splitlines()[-1]
    assert token and " " not in token

    engine = make_engine(stack.database_url)
    try:
        with make_session_factory(engine)() as session:
            instance = session.scalar(select(Instance).where(Instance.name == "shop"))
            assert instance is not None
            assert instance.phone_number_id == "5550001"
            row = session.scalar(select(ApiToken).where(ApiToken.instance_id == instance.id))
            assert row is not None
            # Only the hash is stored, and it is the hash of the printed token.
            assert row.token_hash == hash_secret(token)
            assert token not in row.token_hash
    finally:
        engine.dispose()

    listed = stack_processes.run("instance", "list").stdout
    assert "shop\tcloud\t5550001\tconnected\tsigned" in listed
    assert "key-1" not in listed and "s3cret" not in listed
