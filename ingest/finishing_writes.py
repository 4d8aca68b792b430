"""The writes that record how a download attempt ended, carried through a database outage.

Both are guarded by the attempt's lease (:mod:`ingest.media_rows`), so a worker that lost its
lease changes nothing. A stored copy is recorded in one statement, or, when the instance has a
callback URL, in one transaction with its callback event (the outbox); a result that is not a
copy (a retry, ``failed`` or ``expired``) is recorded with its event and, where the retry
table says so, the instance marked disconnected, in one transaction.

The database going away while an attempt finishes does not lose its result (a verified copy
in storage, a retry decision): the write is tried again while the database is unreachable, for
up to :data:`FINISH_RETRY_SECONDS`, rather than left for the lease to lapse (15 minutes by
default). Past it the error propagates and the lease takes over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

import tenacity
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from ingest import callbacks, media_rows, metrics
from ingest.attempt_errors import AttemptFailed, short
from ingest.db import engine_of, row_count, session_scope
from ingest.in_flight import DATABASE_UNREACHABLE, Attempt, WorkItem
from ingest.media_rules import over_send_limit
from ingest.models import Instance, MediaState
from ingest.retry_policy import Decision
from ingest.storage import StoredObject

# The pipeline's logger: these lines are part of an attempt's story, read and filtered with it.
log = logging.getLogger("ingest.pipeline")

_T = TypeVar("_T")

# How long a finishing write waits out a database outage before the lease takes over.
FINISH_RETRY_SECONDS = 120.0


class FinishingWrites:
    def __init__(self, sessions: sessionmaker[Session], one_statement: Engine) -> None:
        self.sessions = sessions
        self._one_statement = one_statement
        # For the few finishing writes that are two statements (the record and its callback
        # event): a real transaction on every backend.
        self._transactional = engine_of(sessions)
        # Built once: a Retrying keeps its per-call state thread-local, so every thread shares
        # it, and a finishing write (every item) builds nothing.
        self._retries = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(DATABASE_UNREACHABLE),
            stop=tenacity.stop_after_delay(FINISH_RETRY_SECONDS),
            wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=5.0),
            before_sleep=_log_finish_waiting,
            reraise=True,
        )

    def stored(self, work: WorkItem, stored: StoredObject, now: datetime) -> bool:
        """Record the verified copy; False if the lease is no longer this attempt's."""
        return self._through_outage(lambda: self._write_stored(work, stored, now), work)

    def _write_stored(self, work: WorkItem, stored: StoredObject, now: datetime) -> bool:
        # Without a callback URL the record is one statement, in autocommit; with one, the
        # event is written in the transaction that records the copy (the outbox).
        engine = self._transactional if work.announces else self._one_statement
        with engine.begin() as connection:
            recorded = media_rows.finish_stored(connection, _stored_values(work, stored, now))
            if recorded and work.announces:
                callbacks.announce(connection, [work.id], now)
            return recorded

    def stored_many(
        self, copies: Sequence[tuple[WorkItem, StoredObject]], now: datetime
    ) -> set[int]:
        """Record several copies (the rows of one message, all of one lease owner) in one
        transaction; the ids of the rows recorded. The normal case, every lease still held,
        is one batched statement; otherwise each row is written on its own, so one row whose
        lease was lost does not cost the others their record."""
        if len(copies) == 1:
            [(work, stored)] = copies
            return {work.id} if self.stored(work, stored, now) else set()

        def write_all() -> bool:
            with self._transactional.connect() as connection, connection.begin() as transaction:
                matched = media_rows.finish_stored_many(
                    connection, [_stored_values(work, stored, now) for work, stored in copies]
                )
                if matched != len(copies):
                    transaction.rollback()
                    return False
                announced = [work.id for work, _ in copies if work.announces]
                if announced:
                    callbacks.announce(connection, announced, now)
                return True

        if self._through_outage(write_all, copies[0][0]):
            return {work.id for work, _ in copies}
        return {work.id for work, stored in copies if self.stored(work, stored, now)}

    def record_now(self, work: WorkItem, stored: StoredObject, now: datetime) -> bool:
        """Record the copy with one try, for a worker about to exit (no waiting out a
        database outage); False if the lease is no longer this attempt's."""
        return self._write_stored(work, stored, now)

    def not_stored(
        self, attempt: Attempt, decision: Decision, failure: AttemptFailed, now: datetime
    ) -> None:
        self._through_outage(
            lambda: self._write_unstored(attempt, decision, failure, now), attempt.work
        )

    def _through_outage(self, write: Callable[[], _T], work: WorkItem) -> _T:
        """Run a finishing write, again and again while the database is unreachable, for up
        to :data:`FINISH_RETRY_SECONDS`; then the error propagates and the lease takes over."""
        result: _T = self._retries(_finish, write, item_id=work.id)
        return result

    def _write_unstored(
        self, attempt: Attempt, decision: Decision, failure: AttemptFailed, now: datetime
    ) -> None:
        work = attempt.work
        with session_scope(self.sessions) as session:
            written = media_rows.finish_not_stored(
                session,
                work.id,
                work.owner,
                decision,
                last_error=short(failure.detail),
                url_used=attempt.url_used,
                now=now,
            )
            if (
                work.announces
                and decision.state in (MediaState.FAILED, MediaState.EXPIRED)
                and written
            ):
                callbacks.announce(session, [work.id], now)
            if decision.disconnect:
                # Only the attempt that flips the instance says so: other rows of the same
                # instance often meet the same 401 moments later.
                reason = str(failure.outcome)
                flipped = session.execute(
                    update(Instance)
                    .where(Instance.id == work.instance_id, Instance.connected.is_(True))
                    .values(
                        connected=False,
                        disconnected_reason=short(f"{reason}: {failure.detail}"),
                        disconnected_at=now,
                    )
                )
                if row_count(flipped) == 1:
                    metrics.INSTANCE_DISCONNECTS.labels(
                        work.credentials.provider.value, reason
                    ).inc()
                    log.warning(
                        "instance %s disconnected (%s: %s): no provider calls for it until "
                        "`ingest instance connect %s`; stored media is still served",
                        work.instance_name,
                        reason,
                        short(failure.detail),
                        work.instance_name,
                    )


def _stored_values(work: WorkItem, stored: StoredObject, now: datetime) -> media_rows.StoredValues:
    return media_rows.StoredValues(
        item_id=work.id,
        owner=work.owner,
        backend=stored.backend,
        key=stored.key,
        size=stored.size,
        sha256=stored.sha256,
        mime=stored.content_type,
        over_limit=over_send_limit(work.media_type, stored.size, animated=work.animated),
        now=now,
    )


def _finish(write: Callable[[], _T], *, item_id: int) -> _T:
    # item_id rides along for _log_finish_waiting, which sees only the call's arguments.
    return write()


def _log_finish_waiting(state: tenacity.RetryCallState) -> None:
    log.warning(
        "download item=%s cannot record its result yet (database unreachable); retrying",
        state.kwargs.get("item_id"),
    )
