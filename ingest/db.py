"""Engine and session handling: one session per request or task, committed in one place."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

# Execution option for a unit of work that only reads (see the SQLite BEGIN hook below).
READ_ONLY_OPTION = "ingest_read_only"

# The database itself failing: anything the driver raised (down, unreachable, locked, a
# primary turned read-only by a failover, a statement refused) and the pool giving up. Callers
# answer 503 or retry later; SQLAlchemy's complaints about our own use of it are bugs and stay
# loud.
DATABASE_DOWN = (DBAPIError, PoolTimeout)


def make_engine(
    database_url: str, *, ping_after_idle: float | None = None, **kwargs: Any
) -> Engine:
    """An engine for ``database_url``; server databases check a pooled connection is alive.

    By default every checkout pings the server first (``pool_pre_ping``): right for the CLI
    and other occasional users. ``ping_after_idle`` pings only a connection that sat idle in
    the pool at least that many seconds: the web and the worker check out on every request or
    item and would otherwise spend a round trip on each, while a connection that was just
    used is almost certainly alive. A server restart under load still fails
    at most the statements on connections already open, and the first disconnect error
    invalidates the whole pool (SQLAlchemy), so no connection goes on failing.
    """
    # An error's text would otherwise list the statement's parameters: signed media URLs with
    # their query string, captions, senders. Errors get logged; those must not be.
    kwargs["hide_parameters"] = True
    if database_url.startswith("sqlite"):
        # Web, worker threads and beat all write to one file: WAL lets readers run beside a
        # writer, and busy_timeout makes writers queue instead of failing at once.
        engine = create_engine(
            database_url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite opens transactions lazily and never emits BEGIN for SELECT, which
            # breaks read-then-write atomicity; take over BEGIN ourselves.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # A webhook is answered 200 once committed, and the provider never sends it again:
            # under WAL, NORMAL may lose the last commits to a power cut or an OS crash.
            # FULL syncs the log on every commit, at one fsync each.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # IMMEDIATE takes the write lock up front, so two writers never deadlock on a
            # read-lock upgrade (SQLITE_BUSY that busy_timeout cannot wait out). Units of work
            # that only read say so (READ_ONLY) and run beside the writer under WAL.
            if connection.get_execution_options().get(READ_ONLY_OPTION):
                connection.exec_driver_sql("BEGIN DEFERRED")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if ping_after_idle is None:
        return create_engine(database_url, pool_pre_ping=True, **kwargs)
    engine = create_engine(database_url, **kwargs)
    _ping_idle_connections(engine, ping_after_idle)
    return engine


def _ping_idle_connections(engine: Engine, idle_seconds: float) -> None:
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is None or time.monotonic() - checked_in_at < idle_seconds:
            # Never checked in: opened just now. Or used a moment ago: alive.
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError(f"idle connection is dead: {type(exc).__name__}") from exc


_CHECKED_IN_AT = "ingest_checked_in_at"


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def engine_of(sessions: sessionmaker[Session]) -> Engine:
    """The engine a session factory is bound to."""
    engine = sessions.kw["bind"]
    assert isinstance(engine, Engine)
    return engine


def row_count(result: object) -> int:
    """Rows a write matched (0 when the driver cannot say)."""
    return int(getattr(result, "rowcount", 0) or 0)


def one_statement_engine(sessions: sessionmaker[Session]) -> Engine:
    """The sessions' engine, for units of work that are a single statement.

    One ``UPDATE .. RETURNING`` is atomic by itself, so on a server database it runs in
    autocommit: without the BEGIN and COMMIT round trips that would otherwise surround it
    (two of the three per statement, on both ends of the wire). SQLite keeps its
    transactions: the BEGIN IMMEDIATE hook above is what queues its writers.
    """
    engine = engine_of(sessions)
    if engine.dialect.name == "sqlite":
        return engine
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on any error, always close."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
