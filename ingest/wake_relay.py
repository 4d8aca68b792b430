"""The wake-up relay: publish a wake-up for every committed row that has none.

The receiver commits its rows and answers; it never talks to the broker. The rows themselves
are the outbox: a new row has no ``enqueued_at``, and a relay thread in every worker process
(:class:`RelayLoop`) takes such rows (:func:`ingest.media_rows.take_unwoken`, which stamps
them) and publishes their wake-ups, several rows to a message (``settings.wake_batch``).

- **When**: every ``relay_poll_seconds`` (50 ms) it asks whether such a row exists, a read on
  the partial index of unwoken rows that takes no write lock, and passes when one does. Not
  ``LISTEN/NOTIFY`` on PostgreSQL (dropped by migration 0008): PostgreSQL serialises the commits
  of notifying transactions: a notification with every insert cost the receiver's write
  16-26 % of its rate at about 2,000 inserts/s, and 8-23 % more of the machine's CPU an
  insert (``python -m bench.notify_ceiling``, ``docs/THROUGHPUT.md``). A poll costs a read
  every 50 ms per worker process, and a new row at most 50 ms of waiting.
- **Many relays**: every worker process runs one, so a relay is never a single point of
  delay. On PostgreSQL they split the rows (``SKIP LOCKED``) instead of waiting on each
  other; SQLite has one writer anyway.
- **Failures**: a broker that refuses gets the stamps cleared again
  (:func:`ingest.media_rows.forget_enqueued`), so the next pass tries at once. A relay that
  dies between stamp and publish only delays: the reconciler re-wakes any row whose wake-up
  is a lease old, or one interval old while its queue is empty. SQL stays the truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine, bindparam, exists, select
from sqlalchemy.orm import Session, sessionmaker

from ingest import media_rows
from ingest.db import (
    DATABASE_DOWN,
    READ_ONLY_OPTION,
    one_statement_engine,
    session_scope,
)
from ingest.media_rules import queue_for
from ingest.models import MediaItem, MediaState, MediaType, utcnow
from ingest.periodic import BackgroundThread
from ingest.queues import DownloadJob, DownloadScheduler, SchedulerUnavailable
from ingest.settings import Settings

log = logging.getLogger(__name__)

# Rows stamped per statement; a pass repeats until fewer come back.
TAKE_LIMIT = 500
# A lost database or broker: the relay tries again after this long.
RECONNECT_SECONDS = 1.0


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


# What relay_pass would take, asked without taking it. Built once: the relay asks every poll.
_ANY_UNWOKEN = select(
    exists().where(
        MediaItem.state == MediaState.PENDING,
        MediaItem.enqueued_at.is_(None),
        MediaItem.next_attempt_at <= bindparam("due_by"),
    )
)


def any_unwoken(
    sessions: sessionmaker[Session],
    now: datetime | None = None,
    *,
    engine: Engine | None = None,
) -> bool:
    """Is there a row to relay (what :func:`relay_pass` would take)? A read on the relay's
    index, which takes no write lock on SQLite.

    On a Core connection of ``engine`` (the sessions' :func:`~ingest.db.one_statement_engine`
    when not given): one round trip in autocommit on a server database. Every worker process
    asks 20 times a second while idle, and through a session it cost the process 344-458 us a
    time (``docs/THROUGHPUT.md``)."""
    engine = engine or one_statement_engine(sessions)
    with engine.connect().execution_options(**{READ_ONLY_OPTION: True}) as connection:
        return bool(connection.scalar(_ANY_UNWOKEN, {"due_by": now or utcnow()}))


def forget_unsent(sessions: sessionmaker[Session], jobs: list[DownloadJob], who: str) -> None:
    """Clear the stamps of wake-ups that were not sent, so the next pass sends them rather
    than waiting a lease for them. Best effort (the relay's and the reconciler's): with the
    database down too, the reconciler finds the rows once their stamp is a lease old."""
    try:
        with session_scope(sessions) as session:
            media_rows.forget_enqueued(session, jobs)
    except DATABASE_DOWN:
        log.warning("%s: could not clear enqueued_at of %d unsent wake-up(s)", who, len(jobs))


class RelayLoop(BackgroundThread):
    """The relay thread of one worker process: a pass whenever a poll finds rows to relay.

    The poll interval is also the gap between passes under load: a pass takes the rows of
    every commit since the last one. With a gap of a few milliseconds a steady stream of
    webhooks got about one pass per row, and the machine's CPU went to passes instead of
    downloads (``docs/THROUGHPUT.md``)."""

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
        self._one_statement = one_statement_engine(sessions)

    def _loop(self) -> None:
        # The first pass runs at once, without asking: a restarted worker's backlog.
        first = True
        while not self.stopping.is_set():
            delay = self._settings.relay_poll_seconds
            try:
                if first or any_unwoken(self._sessions, engine=self._one_statement):
                    relay_pass(
                        self._sessions,
                        self._scheduler,
                        self._settings,
                        engine=self._one_statement,
                    )
                first = False
            except SchedulerUnavailable as exc:
                log.warning("relay: broker unavailable (%s); trying again", exc)
                delay = max(delay, RECONNECT_SECONDS)
            except DATABASE_DOWN as exc:
                log.warning("relay: database unavailable (%s); trying again", type(exc).__name__)
                delay = max(delay, RECONNECT_SECONDS)
            except Exception:
                log.exception("relay pass failed; trying again")
                delay = max(delay, RECONNECT_SECONDS)
            self.stopping.wait(delay)
