"""Engines: errors never show parameters, SQLite commits survive a power cut, and the worker's
engine pings only idle connections (a dead one is replaced, never handed out)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from ingest import media_rows
from ingest.db import make_engine


@pytest.mark.parametrize("ping_after_idle", [None, 5.0], ids=["ping-always", "ping-idle"])
def test_errors_never_show_statement_parameters(
    database_url: str, ping_after_idle: float | None
) -> None:
    # Errors get logged; a signed URL's query string is a credential.
    url = "https://lookaside.fbsbx.com/?mid=1&hash=SECRETHASH"
    engine = make_engine(database_url, ping_after_idle=ping_after_idle)
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError) as failure:
            conn.execute(text("SELECT * FROM no_such_table WHERE url = :url"), {"url": url})
    finally:
        engine.dispose()
    assert "SECRETHASH" not in str(failure.value)


def test_sqlite_commits_are_synced_to_disk(sqlite_url: str) -> None:
    # An acknowledged webhook is never sent again: its commit must survive a power cut.
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2  # FULL
    finally:
        engine.dispose()


@pytest.fixture
def postgres_url(_postgres_url: str) -> str:
    # Killing a server connection is a PostgreSQL matter: SQLite has no server.
    return _postgres_url


@pytest.fixture
def admin(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _kill(admin: Engine, pid: int) -> None:
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
        conn.commit()
        # Termination is asynchronous: wait until the server has really let it go.
        alive = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        for _ in range(500):
            if not conn.execute(alive, {"pid": pid}).scalar_one():
                return
            conn.rollback()
            time.sleep(0.01)
    pytest.fail(f"backend {pid} did not exit")


def test_an_idle_dead_connection_is_replaced_before_use(postgres_url: str, admin: Engine) -> None:
    # 0 s: every connection that went back to the pool counts as idle when checked out.
    engine = make_engine(postgres_url, ping_after_idle=0.0, pool_size=1, max_overflow=0)
    try:
        first = _backend_pid(engine)
        _kill(admin, first)
        second = _backend_pid(engine)
    finally:
        engine.dispose()
    assert second != first


def test_a_recently_used_connection_is_not_pinged(postgres_url: str, admin: Engine) -> None:
    # Nothing counts as idle: the dead connection is handed out unchecked, its first
    # statement fails, and the pool is invalidated so the next checkout is a new connection.
    engine = make_engine(postgres_url, ping_after_idle=3600.0, pool_size=1, max_overflow=0)
    try:
        first = _backend_pid(engine)
        _kill(admin, first)
        with pytest.raises(OperationalError):
            _backend_pid(engine)
        second = _backend_pid(engine)
    finally:
        engine.dispose()
    assert second != first


def test_the_default_engine_pings_every_checkout(postgres_url: str, admin: Engine) -> None:
    engine = make_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        first = _backend_pid(engine)
        _kill(admin, first)
        second = _backend_pid(engine)
    finally:
        engine.dispose()
    assert second != first


def _arrival_row(message_id: str, now: datetime) -> dict[str, Any]:
    """The columns the receiver gives a new row (ingest.intake), the instance left unchecked:
    the statements below fail before the server reads it."""
    return {
        "instance_id": 1,
        "message_id": message_id,
        "media_type": "image",
        "voice": False,
        "animated": False,
        "over_send_limit": False,
        "received_at": now,
        "expires_at": now,
        "state": "pending",
        "attempts": 0,
        "lease_losses": 0,
        "next_attempt_at": now,
        "updated_at": now,
    }


def test_a_direct_insert_on_a_dead_connection_fails_as_sqlalchemy_and_renews_the_pool(
    postgres_url: str, admin: Engine
) -> None:
    # Two pooled connections, both killed: the first insert meets one and fails with
    # SQLAlchemy's error (the receiver's 503 reads those); the other must not be handed out
    # again, as SQLAlchemy's own disconnect handling ensures for Core statements.
    engine = make_engine(postgres_url, ping_after_idle=3600.0, pool_size=2, max_overflow=0)
    try:
        with engine.connect() as one, engine.connect() as two:
            pids = [
                int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
                for conn in (one, two)
            ]
        for pid in pids:
            _kill(admin, pid)
        with pytest.raises(OperationalError) as raised:
            media_rows.insert_directly(engine, _arrival_row("wamid.dead", datetime.now(UTC)))
        assert raised.value.connection_invalidated
        with engine.connect() as one, engine.connect() as two:
            fresh = [
                int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
                for conn in (one, two)
            ]
    finally:
        engine.dispose()
    assert not set(fresh) & set(pids)


def test_a_direct_insert_refuses_a_naive_datetime(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        with pytest.raises(ValueError, match="naive"):
            media_rows.insert_directly(engine, _arrival_row("wamid.naive", datetime.now()))
    finally:
        engine.dispose()
