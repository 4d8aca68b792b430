"""The media row's state machine: every write to ``media_items``, one function per transition.

A row is created ``pending`` (or ``failed`` at once, for a provider error event) and moves::

    (webhook) ---------- record -------------------> pending | failed
    pending ------------ claim --------------------> downloading   due, no live lease
    downloading -------- claim --------------------> downloading   its lease lapsed: taken
                                                                   over, one loss counted
    downloading -------- renew_lease --------------> downloading   still this attempt's
    downloading -------- hand_back ----------------> pending       the worker is stopping
    pending ------------ defer_unclaimed ----------> pending       the store is failing
    downloading -------- finish_stored ------------> stored
    downloading -------- finish_not_stored --------> pending (retry) | failed | expired
    pending|downloading  expire -------------------> expired       7 days over, no live lease
    downloading -------- give_up_lapsed -----------> failed        worker_lost: lapsed, and
                                                                   the loss limit reached
    downloading -------- release_lapsed -----------> pending       lapsed: one loss counted
    failed|expired ----- redrive ------------------> pending       an operator's decision
    stored ------------- purge --------------------> purged        past the retention
    any but erased ----- erase --------------------> erased        a right-to-erasure request
    any ---------------- delete_with_instance -----> (no row)      the instance is removed

Within a state: :func:`take_unwoken`, :func:`wake`, :func:`wake_redelivered` and
:func:`forget_enqueued` set or clear ``enqueued_at`` (the last wake-up sent) of pending
rows; :func:`purge_urls` drops signed URLs once used or stale.

Each transition is one guarded statement, so one that no longer applies (another worker took
the row, an operator erased it) changes nothing, and its count or returned ids say so. The
guards are named once: :func:`_unleased` (no live lease), :func:`_lapsed` (a lease ran out),
:func:`_loss_limit_reached` (the lease-loss threshold, for the claim and the give-up) and
:func:`_owned` (this attempt still owns the row: every write of an attempt after its claim).

Nothing here opens or commits a transaction: each function runs in its caller's. A transition
that makes a row ``stored``, ``failed`` or ``expired`` returns what it changed, and its caller
announces it (``ingest.callbacks.announce``) in that same transaction, the outbox. The
attempt's statements are built once at import and take bound parameters, run on Core
connections (``ingest.db.one_statement_engine``): a claim or a record per item builds nothing.

Why one module of this size: the row's transitions are read together or not at all. Split,
the guards and the states they protect would again sit in different files, which is what this
module replaced (``tests/test_media_row_writes.py`` keeps every write here).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter

from ingest.db import row_count
from ingest.events import ProviderFault
from ingest.models import Instance, MediaItem, MediaState
from ingest.queues import DownloadJob
from ingest.retry_policy import Decision, Outcome, final_decision

Executor = Session | Connection
AnyRow = Row[*tuple[Any, ...]]

# Rows not yet finished: waiting for an attempt, or in one.
ACTIVE_STATES = (MediaState.PENDING, MediaState.DOWNLOADING)
REDRIVABLE_STATES = (MediaState.FAILED, MediaState.EXPIRED)
# Failure reasons a redrive may still fix once the media id is past its 7 days. Empty, on
# purpose: every path to the bytes goes through the media id (a fresh URL comes from
# resolving it), the provider drops it after 7 days, and our own reconciler expires any
# unfinished row past `expires_at` (and the pipeline refuses one) without a provider call.
# Redriving such a row would only make it `expired` again within one pass.
REDRIVABLE_AFTER_EXPIRY: frozenset[str] = frozenset()
# Rows per executemany call or per IN list; SQLAlchemy splits further to stay under
# parameter limits.
INSERT_CHUNK = 200

_WORKER_LOST = final_decision(Outcome.WORKER_LOST)
# Every way out of ``downloading`` (and erasure) drops the lease.
_NO_LEASE: dict[str, Any] = {"lease_owner": None, "lease_until": None}


# --- the guards --------------------------------------------------------------------------


def _unleased(now: datetime | BindParameter[datetime]) -> ColumnElement[bool]:
    """No live lease: never leased, handed back, or its lease ran out."""
    return or_(MediaItem.lease_until.is_(None), MediaItem.lease_until < now)


def _lapsed(now: datetime) -> ColumnElement[bool]:
    """A lease ran out: an attempt held the row, and its worker died or stopped."""
    return and_(
        MediaItem.state == MediaState.DOWNLOADING,
        MediaItem.lease_until.is_not(None),
        MediaItem.lease_until < now,
    )


def _loss_limit_reached(max_lease_losses: int | BindParameter[int]) -> ColumnElement[bool]:
    """One more lost lease reaches the limit: the row keeps stopping its worker."""
    return MediaItem.lease_losses + 1 >= max_lease_losses


def _owned(
    item_id: int | BindParameter[int], owner: str | BindParameter[str]
) -> ColumnElement[bool]:
    """This attempt still owns the row: a worker that lost its lease never overwrites a
    newer attempt, nor a row erased or purged meanwhile."""
    return and_(
        MediaItem.id == item_id,
        MediaItem.lease_owner == owner,
        MediaItem.state == MediaState.DOWNLOADING,
    )


def _fixable_after_expiry(now: datetime) -> ColumnElement[bool]:
    """The row may be redriven as far as its 7 days go."""
    if not REDRIVABLE_AFTER_EXPIRY:
        return MediaItem.expires_at > now
    return or_(
        MediaItem.expires_at > now,
        and_(
            MediaItem.state == MediaState.FAILED,
            MediaItem.failure_reason.in_(sorted(REDRIVABLE_AFTER_EXPIRY)),
        ),
    )


# --- record ------------------------------------------------------------------------------


def arrival(fault: ProviderFault | None, received_at: datetime) -> dict[str, Any]:
    """The state columns of a new row: ``pending`` and due, or ``failed`` at once when the
    provider reported an error instead of the media."""
    if fault is not None:
        return {
            "state": MediaState.FAILED.value,
            "failure_reason": fault.reason,
            "last_error": fault.describe(),
            "download_url": None,
            "url_deadline": None,
            "enqueued_at": None,
        }
    # No wake-up yet: the relay in the workers publishes one once the row is committed
    # (take_unwoken), and the reconciler would if no relay ran.
    return {
        "state": MediaState.PENDING.value,
        "failure_reason": None,
        "last_error": None,
        "enqueued_at": None,
    }


def record(executor: Executor, rows: Sequence[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """Insert these rows, ignoring any whose ``(instance, message id)`` exists; returns
    ``(id, instance id, message id)`` of the rows inserted.

    One statement, built once per dialect and cached compiled; the rows go as executemany
    parameters (SQLAlchemy's "insertmanyvalues" batches them into multi-row INSERTs, and
    RETURNING answers only the rows that were actually inserted), so concurrent deliveries of
    one message race safely in the database and exactly one of them learns the row is new.
    """
    bind = executor if isinstance(executor, Connection) else executor.get_bind()
    stmt = _insert_statement(bind.dialect.name)
    inserted: list[tuple[int, int, str]] = []
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        inserted += [
            (item_id, instance_id, message_id)
            for item_id, instance_id, message_id in executor.execute(stmt, chunk)
        ]
    return inserted


def inserts_directly(engine: Engine) -> bool:
    """Can :func:`insert_directly` run on this engine's driver? (PostgreSQL's psycopg: SQLite's
    binds convert values on the way, datetimes to text, which driver SQL would skip.)"""
    return engine.dialect.name == "postgresql" and engine.dialect.paramstyle == "pyformat"


def insert_directly(engine: Engine, row: dict[str, Any]) -> bool:
    """:func:`record` for one row, run on the pooled driver connection in autocommit (one
    statement is atomic by itself); whether the row was new.

    The receiver's every webhook. SQLAlchemy's ``Connection`` around this one statement (the
    compiled cache, the defaults, a bind processor per value, the result, switching the
    connection to autocommit and back) cost more of a webhook's CPU than anything else left
    on its path: measured in ``docs/THROUGHPUT.md`` ("The insert without SQLAlchemy"). What
    it did that matters is kept here: the statement is SQLAlchemy's, compiled once; the
    checkout is the pool's (its ping of an idle connection included); the errors are raised
    as SQLAlchemy's, a disconnect invalidating the connection and the pool's others with it;
    and ``UTCDateTime``'s refusal of a naive datetime, which PostgreSQL would read in the
    session's time zone.
    """
    sql = _driver_insert(engine.dialect, frozenset(row))
    for value in row.values():
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
    dialect = engine.dialect
    pooled = engine.raw_connection()
    try:
        driver = pooled.driver_connection
        assert driver is not None  # checked out: open
        driver.autocommit = True
        try:
            with driver.cursor() as cursor:
                cursor.execute(sql, row)
                return cursor.fetchone() is not None
        finally:
            driver.autocommit = False
    except dialect.loaded_dbapi.Error as exc:
        disconnect = dialect.is_disconnect(exc, pooled.dbapi_connection, None)
        if disconnect:
            pooled.invalidate(exc)
            # As SQLAlchemy does on a disconnect: the pool's other connections went with the
            # server, so none is handed out again (a new pool; the old one's idle ones closed,
            # those checked out by other requests left to them).
            engine.dispose()
        raise DBAPIError.instance(
            sql,
            None,
            exc,
            dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=disconnect,
            dialect=dialect,
        ) from exc
    finally:
        pooled.close()


@functools.cache
def _driver_insert(dialect: Dialect, columns: frozenset[str]) -> str:
    """The insert of :func:`record` for exactly these columns, as the driver's SQL.

    Driver SQL fills in no Python-side column default: a row that leaves one out (the
    compiled statement then names a parameter the row lacks) is a programming error."""
    compiled: SQLCompiler = _insert_statement(dialect.name).compile(
        dialect=dialect, column_keys=columns
    )
    missing = set(compiled.binds) - columns
    if missing:
        raise ValueError(f"row leaves columns to their Python-side defaults: {sorted(missing)}")
    return compiled.string


@functools.cache
def _insert_statement(dialect_name: str) -> Any:
    table = MediaItem.__table__
    if dialect_name == "postgresql":
        insert: Any = postgresql.insert
    elif dialect_name == "sqlite":
        insert = sqlite.insert
    else:
        raise NotImplementedError(f"no conflict-ignoring insert for dialect {dialect_name!r}")
    return (
        insert(table)
        .on_conflict_do_nothing(index_elements=["instance_id", "message_id"])
        .returning(table.c.id, table.c.instance_id, table.c.message_id)
    )


# --- one attempt -------------------------------------------------------------------------

# What an attempt reads from its row, returned by the claiming UPDATE itself.
_CLAIM_COLUMNS = (
    MediaItem.id,
    MediaItem.attempts,
    MediaItem.lease_losses,
    MediaItem.instance_id,
    MediaItem.message_id,
    MediaItem.media_id,
    MediaItem.media_type,
    MediaItem.animated,
    MediaItem.declared_mime,
    MediaItem.declared_sha256,
    MediaItem.declared_size,
    MediaItem.received_at,
    MediaItem.expires_at,
    MediaItem.download_url,
    MediaItem.url_deadline,
)

# Only a row that is due and holds no live lease can be claimed. Taking over a row still in
# ``downloading`` means its last lease ran out: that counts as a lease loss, and the row whose
# losses would reach max_lease_losses is left to the reconciler to fail as worker_lost.
# The rows of one wake-up are claimed together: one statement (and, on PostgreSQL, one round
# trip) for up to settings.wake_batch rows instead of one each.
# The rows are found by id alone: the other conditions sit inside COALESCE (a NULL among them
# is "not claimable"), where no index can serve them. Side by side with ``id IN (...)``,
# PostgreSQL chose the ``(state, next_attempt_at)`` index whenever its statistics said few rows
# were pending (a fresh table, or a burst into a big one far under autovacuum's threshold),
# and each claim of 16 rows read every due row of the backlog.
_CLAIMABLE = and_(
    MediaItem.state.in_(ACTIVE_STATES),
    MediaItem.next_attempt_at <= bindparam("p_now"),
    _unleased(bindparam("p_now")),
    ~(
        (MediaItem.state == MediaState.DOWNLOADING)
        & _loss_limit_reached(bindparam("p_max_lease_losses"))
    ),
)
_CLAIM = (
    update(MediaItem)
    .where(MediaItem.id.in_(bindparam("p_ids", expanding=True)))
    .where(func.coalesce(_CLAIMABLE, false()))
    .values(
        state=MediaState.DOWNLOADING,
        lease_owner=bindparam("p_owner"),
        lease_until=bindparam("p_lease_until"),
        attempts=MediaItem.attempts + 1,
        lease_losses=MediaItem.lease_losses
        + case((MediaItem.state == MediaState.DOWNLOADING, 1), else_=0),
        updated_at=bindparam("p_now"),
    )
    # The values the attempt needs come back with the claim: no second read of the row.
    .returning(*_CLAIM_COLUMNS)
)

_INSTANCE_COLUMNS = (
    Instance.name.label("instance_name"),
    Instance.connected.label("instance_connected"),
    Instance.provider.label("instance_provider"),
    Instance.phone_number_id.label("instance_phone_number_id"),
    Instance.api_key_encrypted.label("instance_api_key_encrypted"),
    Instance.callback_url.is_not(None).label("instance_announces"),
)

# PostgreSQL: the instance's columns come back from the same statement (UPDATE .. FROM), one
# round trip per claim instead of two. SQLite's RETURNING cannot name a FROM table, so there
# the instance is read by a second statement in the same transaction.
_CLAIM_WITH_INSTANCE = _CLAIM.where(MediaItem.instance_id == Instance.id).returning(
    *_INSTANCE_COLUMNS
)
_INSTANCES_FOR_ATTEMPTS = select(Instance.id, *_INSTANCE_COLUMNS).where(
    Instance.id.in_(bindparam("p_instance_ids", expanding=True))
)

_ATTEMPT_OWNS_ROW = _owned(bindparam("p_id"), bindparam("p_owner"))

# Extends only a lease that is still ours: no row matched means another worker owns the row.
_RENEW_LEASE = (
    update(MediaItem)
    .where(_ATTEMPT_OWNS_ROW)
    .values(lease_until=bindparam("p_lease_until"), updated_at=bindparam("p_now"))
)

# A stopping worker hands the row back as it was before the claim: due now, the attempt given
# back (no provider call finished), the wake-up forgotten so a relay re-publishes it at once.
_HAND_BACK = (
    update(MediaItem)
    .where(MediaItem.id.in_(bindparam("p_ids", expanding=True)))
    .where(MediaItem.lease_owner == bindparam("p_owner"))
    .where(MediaItem.state == MediaState.DOWNLOADING)
    .values(
        state=MediaState.PENDING,
        attempts=MediaItem.attempts - 1,
        next_attempt_at=bindparam("p_now"),
        enqueued_at=None,
        last_error="handed back: the worker stopped mid-attempt",
        **_NO_LEASE,
        updated_at=bindparam("p_now"),
    )
)

# A due row whose download would be thrown away (the object store is failing) waits for the
# store's next probe instead; no claim, no attempt counted.
_DEFER_UNCLAIMED = (
    update(MediaItem)
    .where(MediaItem.id == bindparam("p_id"))
    .where(MediaItem.state == MediaState.PENDING)
    .where(MediaItem.next_attempt_at <= bindparam("p_now"))
    .where(_unleased(bindparam("p_now")))
    .values(next_attempt_at=bindparam("p_next"), updated_at=bindparam("p_now"))
)

_RECORD_STORED = (
    update(MediaItem)
    .where(_ATTEMPT_OWNS_ROW)
    .values(
        state=MediaState.STORED,
        storage_backend=bindparam("p_backend"),
        storage_key=bindparam("p_key"),
        size=bindparam("p_size"),
        actual_sha256=bindparam("p_sha256"),
        actual_mime=bindparam("p_mime"),
        over_send_limit=bindparam("p_over_limit"),
        stored_at=bindparam("p_now"),
        download_url=None,
        failure_reason=None,
        last_error=None,
        **_NO_LEASE,
        updated_at=bindparam("p_now"),
    )
)


def claim(
    connection: Connection,
    item_ids: Sequence[int],
    *,
    owner: str,
    now: datetime,
    lease_until: datetime,
    max_lease_losses: int,
) -> list[tuple[AnyRow, AnyRow]]:
    """Lease the rows to ``owner``; returns, for each row claimed, its columns
    (``_CLAIM_COLUMNS``) and its instance's (``instance_*``). A row that is not due, leased,
    finished, or at its lease-loss limit (the reconciler gives that one up) is left out."""
    if not item_ids:
        return []
    joined = connection.dialect.name == "postgresql"
    items = connection.execute(
        _CLAIM_WITH_INSTANCE if joined else _CLAIM,
        {
            "p_ids": list(item_ids),
            "p_now": now,
            "p_max_lease_losses": max_lease_losses,
            "p_owner": owner,
            "p_lease_until": lease_until,
        },
    ).all()
    if joined or not items:
        return [(item, item) for item in items]
    instances = {
        instance.id: instance
        for instance in connection.execute(
            _INSTANCES_FOR_ATTEMPTS, {"p_instance_ids": sorted({i.instance_id for i in items})}
        )
    }
    return [(item, instances[item.instance_id]) for item in items]


def renew_lease(
    connection: Connection, item_id: int, owner: str, *, now: datetime, lease_until: datetime
) -> bool:
    """Extend the attempt's lease; False when the row is no longer its own."""
    renewed = connection.execute(
        _RENEW_LEASE,
        {"p_id": item_id, "p_owner": owner, "p_lease_until": lease_until, "p_now": now},
    )
    return row_count(renewed) == 1


def hand_back(connection: Connection, item_ids: Sequence[int], owner: str, now: datetime) -> None:
    """Give the rows back as they were before ``owner`` claimed them (those it still holds)."""
    if item_ids:
        connection.execute(_HAND_BACK, {"p_ids": list(item_ids), "p_owner": owner, "p_now": now})


def defer_unclaimed(
    connection: Connection, item_id: int, *, now: datetime, next_attempt_at: datetime
) -> None:
    connection.execute(_DEFER_UNCLAIMED, {"p_id": item_id, "p_now": now, "p_next": next_attempt_at})


@dataclass(frozen=True)
class StoredValues:
    """What recording one verified copy writes to its row."""

    item_id: int
    owner: str
    backend: str
    key: str
    size: int
    sha256: str
    mime: str
    over_limit: bool
    now: datetime

    def parameters(self) -> dict[str, object]:
        return {
            "p_id": self.item_id,
            "p_owner": self.owner,
            "p_backend": self.backend,
            "p_key": self.key,
            "p_size": self.size,
            "p_sha256": self.sha256,
            "p_mime": self.mime,
            "p_over_limit": self.over_limit,
            "p_now": self.now,
        }


def finish_stored(connection: Connection, copy: StoredValues) -> bool:
    """Record the verified copy; False when the attempt no longer owns the row."""
    return row_count(connection.execute(_RECORD_STORED, copy.parameters())) == 1


def finish_stored_many(connection: Connection, copies: Sequence[StoredValues]) -> int:
    """Record several copies with one statement executed for each (psycopg sends them in one
    round trip); how many rows their attempts still owned, and so recorded."""
    return row_count(connection.execute(_RECORD_STORED, [c.parameters() for c in copies]))


def finish_not_stored(
    executor: Executor,
    item_id: int,
    owner: str,
    decision: Decision,
    *,
    last_error: str,
    url_used: bool,
    now: datetime,
) -> bool:
    """Write the retry table's ``decision`` (retry, fail or expire); False when the attempt
    no longer owns the row."""
    values: dict[str, object] = {
        "state": decision.state,
        "failure_reason": decision.failure_reason,
        "last_error": last_error,
        **_NO_LEASE,
        "updated_at": now,
    }
    if decision.next_attempt_at is not None:
        values["next_attempt_at"] = decision.next_attempt_at
    if decision.refund_attempt:
        values["attempts"] = MediaItem.attempts - 1
    if url_used or decision.state != MediaState.PENDING:
        # Used once, or no longer needed: the signed URL is not kept.
        values["download_url"] = None
    written = executor.execute(
        update(MediaItem)
        .where(_owned(item_id, owner))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return row_count(written) == 1


# --- the reconciler's transitions ----------------------------------------------------------


def expire(executor: Executor, now: datetime) -> list[int]:
    """Rows past their 7 days without a copy, and no live lease, become ``expired``."""
    expired = executor.execute(
        update(MediaItem)
        .where(MediaItem.state.in_(ACTIVE_STATES))
        .where(MediaItem.expires_at <= now)
        .where(_unleased(now))
        .values(
            state=MediaState.EXPIRED,
            last_error="media id expired (7 days) before a copy was stored",
            download_url=None,
            **_NO_LEASE,
            updated_at=now,
        )
        .returning(MediaItem.id)
        .execution_options(synchronize_session=False)
    )
    return list(expired.scalars().all())


def give_up_lapsed(executor: Executor, now: datetime, max_lease_losses: int) -> list[int]:
    """Rows whose lease ran out for the ``max_lease_losses``-th time fail as ``worker_lost``:
    the item keeps stopping its worker. Run before :func:`release_lapsed`."""
    lost = executor.execute(
        update(MediaItem)
        .where(_lapsed(now))
        .where(_loss_limit_reached(max_lease_losses))
        .values(
            state=_WORKER_LOST.state,
            failure_reason=_WORKER_LOST.failure_reason,
            lease_losses=MediaItem.lease_losses + 1,
            last_error=(
                f"lease ran out {max_lease_losses} times: the item keeps stopping its worker"
            ),
            download_url=None,
            **_NO_LEASE,
            updated_at=now,
        )
        .returning(MediaItem.id)
        .execution_options(synchronize_session=False)
    )
    return list(lost.scalars().all())


def release_lapsed(executor: Executor, now: datetime) -> int:
    """Rows whose lease ran out go back to ``pending``, due now, one more loss counted."""
    released = executor.execute(
        update(MediaItem)
        .where(_lapsed(now))
        .values(
            state=MediaState.PENDING,
            lease_losses=MediaItem.lease_losses + 1,
            last_error="lease ran out (worker lost or stopped)",
            next_attempt_at=now,
            **_NO_LEASE,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return row_count(released)


def purge_urls(executor: Executor, now: datetime) -> int:
    """Signed URLs are kept only until used or stale."""
    purged = executor.execute(
        update(MediaItem)
        .where(MediaItem.download_url.is_not(None))
        .where(
            or_(
                MediaItem.url_deadline.is_(None),
                MediaItem.url_deadline <= now,
                MediaItem.state.not_in(ACTIVE_STATES),
            )
        )
        .values(download_url=None)
        .execution_options(synchronize_session=False)
    )
    return row_count(purged)


# --- wake-ups ----------------------------------------------------------------------------


def wake(executor: Executor, item_ids: Sequence[int], now: datetime) -> None:
    """Record that a wake-up is being published for these rows."""
    executor.execute(
        update(MediaItem)
        .where(MediaItem.id.in_(item_ids))
        .values(enqueued_at=now)
        .execution_options(synchronize_session=False)
    )


# Built once, like the claim: the relay passes every 50 ms under load, and a statement built
# per pass spent more CPU generating its cache key than PostgreSQL spent running it.
# The rows are picked (and locked) once, in a materialised CTE, and the update joins them by
# primary key. Written as ``id IN (subquery)``, PostgreSQL may plan a semi-join that runs the
# LIMIT .. FOR UPDATE subquery again for every unwoken row: with statistics that predate a
# backlog (a fresh table, or a burst far under autovacuum's 10 % threshold) it did, and one
# pass over 2,500 rows took 7 s and 9 million buffer hits while the claims queued on its locks.
_TAKEN = (
    select(MediaItem.id)
    .where(MediaItem.state == MediaState.PENDING, MediaItem.enqueued_at.is_(None))
    .where(MediaItem.next_attempt_at <= bindparam("p_now"))
    .order_by(MediaItem.id)
    .limit(bindparam("p_limit"))
    .with_for_update(skip_locked=True)
    .cte("taken")
    .prefix_with("MATERIALIZED", dialect="postgresql")
)
_TAKE_UNWOKEN = (
    update(MediaItem)
    .where(MediaItem.id == _TAKEN.c.id)
    .where(MediaItem.state == MediaState.PENDING, MediaItem.enqueued_at.is_(None))
    .values(enqueued_at=bindparam("p_now"))
    .returning(MediaItem.id, MediaItem.media_type, MediaItem.declared_size)
    .execution_options(synchronize_session=False)
)


def take_unwoken(executor: Executor, now: datetime, limit: int) -> list[AnyRow]:
    """Stamp a wake-up on at most ``limit`` pending, due rows that never had one (committed by
    the receiver, or whose wake-up could not be sent), oldest first; returns their
    ``(id, media_type, declared_size)``. On PostgreSQL, rows another relay is taking are
    skipped, not waited for (``SKIP LOCKED``); SQLite has a single writer anyway."""
    return list(executor.execute(_TAKE_UNWOKEN, {"p_now": now, "p_limit": limit}).all())


def wake_redelivered(
    executor: Executor,
    keys: Sequence[tuple[int, str]],
    *,
    now: datetime,
    stale_before: datetime,
) -> int:
    """Of the rows these ``(instance id, message id)`` name, clear the wake-up of those still
    pending and due whose last wake-up is older than ``stale_before``, so that the relay
    sends a new one; returns how many."""
    woken = 0
    for start in range(0, len(keys), INSERT_CHUNK):
        woken += row_count(
            executor.execute(
                update(MediaItem)
                .where(
                    tuple_(MediaItem.instance_id, MediaItem.message_id).in_(
                        keys[start : start + INSERT_CHUNK]
                    )
                )
                .where(MediaItem.state == MediaState.PENDING)
                .where(MediaItem.next_attempt_at <= now)
                .where(MediaItem.enqueued_at < stale_before)
                .values(enqueued_at=None)
                .execution_options(synchronize_session=False)
            )
        )
    return woken


def forget_enqueued(executor: Executor, jobs: Sequence[DownloadJob]) -> None:
    """The wake-ups were not sent: mark the rows as never enqueued, so a relay's next pass
    (or the reconciler's) sends them rather than waiting for a wake-up that never left."""
    if not jobs:
        return
    executor.execute(
        update(MediaItem)
        .where(MediaItem.id.in_([job.media_item_id for job in jobs]))
        .where(MediaItem.state == MediaState.PENDING)
        .values(enqueued_at=None)
    )


# --- an operator's decisions -------------------------------------------------------------


def redrive(
    executor: Executor, item_ids: Sequence[int], states: Sequence[str], now: datetime
) -> int:
    """Put these rows back to ``pending``, due now, with a fresh attempt count and no wake-up
    recorded, if they are still in ``states`` and fixable as far as their 7 days go."""
    redriven = executor.execute(
        update(MediaItem)
        .where(MediaItem.id.in_(item_ids))
        .where(MediaItem.state.in_(states))
        .where(_fixable_after_expiry(now))
        .values(
            state=MediaState.PENDING,
            next_attempt_at=now,
            attempts=0,
            lease_losses=0,
            failure_reason=None,
            last_error=None,
            **_NO_LEASE,
            enqueued_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return row_count(redriven)


def purge(executor: Executor, item_ids: Sequence[int], *, removed_by: str, now: datetime) -> int:
    """These stored rows' objects are gone (retention): they become ``purged``."""
    purged = executor.execute(
        update(MediaItem)
        .where(MediaItem.id.in_(item_ids))
        .where(MediaItem.state == MediaState.STORED)
        .values(
            state=MediaState.PURGED,
            removed_at=now,
            removed_by=removed_by,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return row_count(purged)


def erase(executor: Executor, item_id: int, *, by: str, now: datetime) -> bool:
    """The row becomes ``erased``, with who asked and when. What identifies the person or the
    content goes; what the audit needs stays (message id, type, size, checksum, when it was
    stored and erased, by whom). False when it was erased already."""
    erased = executor.execute(
        update(MediaItem)
        .where(MediaItem.id == item_id)
        .where(MediaItem.state != MediaState.ERASED)
        .values(
            state=MediaState.ERASED,
            removed_at=now,
            removed_by=by,
            caption=None,
            filename=None,
            sender=None,
            media_id=None,
            download_url=None,
            **_NO_LEASE,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return row_count(erased) == 1


def delete_with_instance(executor: Executor, instance_id: int) -> None:
    """The instance is being removed: its rows go with it (the caller has deleted their
    callback events, which refer to them)."""
    executor.execute(delete(MediaItem).where(MediaItem.instance_id == instance_id))
