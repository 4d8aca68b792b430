"""Engines: errors never show parameters, SQLite commits survive a power cut, and the worker's
engine pings only idle connections (a dead one is replaced, never handed out)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

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
