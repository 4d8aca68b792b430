"""The wake-up relay: publish a wake-up for every committed row that has none.

The receiver commits its rows and answers; it never talks to the broker. The rows themselves
are the outbox: a new row has no ``enqueued_at``, and a relay thread in every worker process
(:class:`RelayLoop`) takes such rows (:func:`ingest.media_rows.take_unwoken`, which stamps
them) and publishes their wake-ups, several rows to a message (``settings.wake_batch``).

- **When**: on PostgreSQL a trigger sends ``NOTIFY ingest_media_new`` with every insert into
  ``media_items``, delivered at commit, and the relay ``LISTEN``s (:class:`Notifications`);
  it also passes every ``relay_fallback_seconds`` in case a notification was missed (its
  connection was lost). Elsewhere (the embedded SQLite) it looks every
  ``relay_poll_seconds``, with a read that takes no write lock when there is nothing to do.
- **Many relays**: every worker process runs one, so a relay is never a single point of
  delay. On PostgreSQL they split the rows (``SKIP LOCKED``) instead of waiting on each
  other; SQLite has one writer anyway.
- **Failures**: a broker that refuses gets the stamps cleared again
  (:func:`ingest.media_rows.forget_enqueued`), so the next pass tries at once. A relay that
  dies between stamp and publish only delays: the reconciler re-wakes any row whose wake-up
  is a lease old, or one interval old while its queue is empty. SQL stays the truth.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Engine, exists, select
from sqlalchemy.orm import Session, sessionmaker

from ingest import media_rows
from ingest.db import (
    DATABASE_DOWN,
    READ_ONLY_OPTION,
    engine_of,
    one_statement_engine,
    session_scope,
)
from ingest.media_rules import queue_for
from ingest.models import MediaItem, MediaState, MediaType, utcnow
from ingest.periodic import BackgroundThread
from ingest.queues import DownloadJob, DownloadScheduler, SchedulerUnavailable
from ingest.settings import Settings

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

CHANNEL = "ingest_media_new"
# Rows stamped per statement; a pass repeats until fewer come back.
TAKE_LIMIT = 500
# Under load a notification arrives with every commit: after a pass the relay lets this
# long go by, so the next pass takes the rows of many commits at once. Every pass costs an
# UPDATE in each worker process: with a gap of a few milliseconds a steady stream of webhooks
# got about one pass per row, and the machine's CPU went to passes instead of downloads
# (docs/THROUGHPUT.md). It adds at most this much to a row's wait when traffic is light.
MIN_GAP_SECONDS = 0.05
# A lost LISTEN connection is opened again after this long (meanwhile the relay polls).
RECONNECT_SECONDS = 1.0
# How soon a relay waiting for a notification notices that it is stopping.
STOP_CHECK_SECONDS = 0.25


def relay_pass(
    sessions: sessionmaker[Session],
    scheduler: DownloadScheduler,
    settings: Settings,
    now: Callable[[], datetime] = utcnow,
    *,
    engine: Engine | None = None,
) -> int:
    """Publish the wake-ups of every row that has none; returns how many rows were woken.
    Raises :class:`SchedulerUnavailable` when the broker refuses (the rows are unstamped).
    ``engine``: the sessions' :func:`~ingest.db.one_statement_engine`, if the caller keeps one
    (building it registers event listeners: a loop should not pay that every pass)."""
    engine = engine or one_statement_engine(sessions)
    woken = 0
    while True:
        with engine.begin() as connection:
            rows = media_rows.take_unwoken(connection, now(), TAKE_LIMIT)
        if not rows:
            return woken
        jobs = [
            DownloadJob(item_id, queue_for(MediaType(kind), size, settings.large_media_bytes))
            for item_id, kind, size in rows
        ]
        try:
            scheduler.schedule(jobs)
        except BaseException:
            forget_unsent(sessions, jobs, "relay")
            raise
        woken += len(jobs)
        if len(rows) < TAKE_LIMIT:
            return woken


def any_unwoken(sessions: sessionmaker[Session], now: datetime | None = None) -> bool:
    """Is there a row to relay (what :func:`relay_pass` would take)? A read, which takes no
    write lock on SQLite, on the relay's index."""
    due_by = now or utcnow()
    with session_scope(sessions) as session:
        session.connection(execution_options={READ_ONLY_OPTION: True})
        return bool(
            session.scalar(
                select(
                    exists().where(
                        MediaItem.state == MediaState.PENDING,
                        MediaItem.enqueued_at.is_(None),
                        MediaItem.next_attempt_at <= due_by,
                    )
                )
            )
        )


def forget_unsent(sessions: sessionmaker[Session], jobs: list[DownloadJob], who: str) -> None:
    """Clear the stamps of wake-ups that were not sent, so the next pass sends them rather
    than waiting a lease for them. Best effort (the relay's and the reconciler's): with the
    database down too, the reconciler finds the rows once their stamp is a lease old."""
    try:
        with session_scope(sessions) as session:
            media_rows.forget_enqueued(session, jobs)
    except DATABASE_DOWN:
        log.warning("%s: could not clear enqueued_at of %d unsent wake-up(s)", who, len(jobs))


class Notifications:
    """``LISTEN`` on a connection of its own (PostgreSQL, psycopg 3): :meth:`wait` returns
    when rows were inserted, or after ``timeout``. A lost connection is reopened a little
    later (:meth:`listening`); meanwhile the relay polls."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0

    def listening(self) -> bool:
        """Is the connection listening? (Re)opens it when it is time to try again."""
        if self._connection is None and time.monotonic() >= self._retry_at:
            try:
                raw = self._engine.raw_connection()
                driver = cast("psycopg.Connection[Any]", raw.driver_connection)
                # Detached from the pool: this connection only listens, for the process's life.
                raw.detach()
                driver.autocommit = True
                driver.execute(f"LISTEN {CHANNEL}")
                self._connection = driver
            except Exception as exc:  # noqa: BLE001 - the relay polls until it is back
                log.warning("relay: cannot listen for new rows (%s); polling", type(exc).__name__)
                self._retry_at = time.monotonic() + RECONNECT_SECONDS
        return self._connection is not None

    def wait(self, timeout: float, stopping: threading.Event) -> None:
        """Until a notification comes (all those waiting are consumed), ``timeout`` passes
        or ``stopping`` is set (seen within :data:`STOP_CHECK_SECONDS`)."""
        connection = self._connection
        if connection is None:
            return
        deadline = time.monotonic() + timeout
        try:
            while not stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                slice_seconds = min(remaining, STOP_CHECK_SECONDS)
                if any(True for _ in connection.notifies(timeout=slice_seconds, stop_after=1)):
                    # Drain what else arrived: one pass serves them all.
                    for _ in connection.notifies(timeout=0):
                        pass
                    return
        except Exception as exc:  # noqa: BLE001 - reopened later; the relay polls meanwhile
            log.warning("relay: lost the listening connection (%s)", type(exc).__name__)
            self.close()
            self._retry_at = time.monotonic() + RECONNECT_SECONDS

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                connection.close()


class RelayLoop(BackgroundThread):
    """The relay thread of one worker process."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        scheduler: DownloadScheduler,
        settings: Settings,
    ) -> None:
        super().__init__("wake-relay")
        self._sessions = sessions
        self._scheduler = scheduler
        self._settings = settings
        engine = engine_of(sessions)
        self._notifications = Notifications(engine) if engine.dialect.name == "postgresql" else None
        self._one_statement = one_statement_engine(sessions)

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        if self._notifications is not None:
            self._notifications.close()

    def _wait(self) -> bool:
        """Wait for the next reason to pass: True after a notification or the fallback
        interval (pass at once), False after a poll interval (look cheaply first)."""
        if self._notifications is not None and self._notifications.listening():
            self._notifications.wait(self._settings.relay_fallback_seconds, self.stopping)
            return True
        self.stopping.wait(self._settings.relay_poll_seconds)
        return False

    def _loop(self) -> None:
        # The first pass runs at once: rows committed while no worker ran announced
        # themselves to nobody, and would otherwise wait for the fallback interval.
        announced = True
        if self._notifications is not None:
            self._notifications.listening()  # before that pass, so no later row is missed
        while not self.stopping.is_set():
            try:
                if announced or any_unwoken(self._sessions):
                    relay_pass(
                        self._sessions,
                        self._scheduler,
                        self._settings,
                        engine=self._one_statement,
                    )
            except SchedulerUnavailable as exc:
                log.warning("relay: broker unavailable (%s); trying again", exc)
                self.stopping.wait(RECONNECT_SECONDS)
            except DATABASE_DOWN as exc:
                log.warning("relay: database unavailable (%s); trying again", type(exc).__name__)
                self.stopping.wait(RECONNECT_SECONDS)
            except Exception:
                log.exception("relay pass failed; trying again")
                self.stopping.wait(RECONNECT_SECONDS)
            self.stopping.wait(MIN_GAP_SECONDS)
            announced = self._wait()
