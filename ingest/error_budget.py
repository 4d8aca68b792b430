"""Per-phone-number provider error budget, shared by every worker thread and process.

The provider throttles on *errors*: 20 error responses in 60 minutes block a number's media
GETs for 30 minutes, and 360dialog blocks ``GET /<media-id>`` for an hour after 5 failed
lookups. We keep a sliding window of errors per number and stop calling one short of each
threshold (``settings.error_budget_media``, ``settings.error_budget_lookup_360dialog``), so the
provider never blocks us; the number resumes by itself when old errors leave the window.

Many threads call at once, and any call in flight may still become an error, so counting
only past errors could overshoot. Each provider call therefore *reserves* a slot first (a
reservation counts against the budget like an error), and then either *releases* it (the call
succeeded, or failed without the provider seeing an error) or *confirms* it (an error
response: it stays, dated now). The number of errors in a window can thus never exceed the
limit, whatever the concurrency.

A reservation is bounded by the call it guards: one that is neither confirmed nor released
within ``in_flight_ttl_seconds`` (the HTTP timeout or the lease, whichever is shorter) belongs
to a worker that was killed, and stops counting. A long transfer keeps its reservation alive
with :meth:`ErrorBudget.renew`. A budget that is full only because of calls in flight frees
within seconds, so :func:`guarded` waits a little for such a slot instead of deferring the
row for a whole window; only confirmed errors defer for long.

Bookkeeping must never undo work: when the budget's store fails while *releasing* or
*confirming* (Redis blipped after the transfer), the failure is logged and the call's own
result stands. Only a failed *reservation* stops a call, since no call may go unguarded.

Two backends with the same rules: :class:`RedisErrorBudget` (a sorted set per key, checked
and updated by one Lua script, so the check and the reservation are atomic across processes)
and :class:`SqlErrorBudget` (rows in ``error_budget_events``, serialised per key by an
advisory lock on PostgreSQL and by SQLite's single writer).

Why one module of this size: the two backends sit beside the rules they both implement
(reserve, confirm, release, the in-flight time-to-live), so each can be read against them.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ingest.db import session_scope
from ingest.models import ErrorBudgetEvent, Provider, utcnow
from ingest.providers import Endpoint, ProviderError
from ingest.settings import Settings

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# When a budget is full only because of calls still in flight, a slot is likely to free as
# soon as one of them ends: look again after this long rather than a whole window later.
IN_FLIGHT_RETRY_SECONDS = 0.5


@dataclass(frozen=True)
class BudgetLimit:
    key: str  # e.g. "media:<phone_number_id>"; backends add their own prefix
    limit: int  # at most this many errors (and calls in flight) per window


@dataclass(frozen=True)
class Reservation:
    token: str
    keys: tuple[str, ...]
    row_ids: tuple[int, ...] = ()  # SQL backend only


class BudgetExhausted(Exception):
    """The number's budget is spent: do not call the provider before ``retry_at``.

    ``in_flight``: the first slot to free is held by a call still in flight (likely to end
    within seconds), not by a confirmed error (which frees only when it leaves the window).
    """

    def __init__(self, key: str, retry_at: datetime, *, in_flight: bool = False) -> None:
        super().__init__(f"error budget {key} is spent until {retry_at.isoformat()}")
        self.key = key
        self.retry_at = retry_at
        self.in_flight = in_flight


class BudgetUnavailable(Exception):
    """The budget's store (Redis or SQL) failed: no provider call may be made unguarded."""


class ErrorBudget(Protocol):
    def reserve(self, limits: Sequence[BudgetLimit]) -> Reservation:
        """Take one slot in every limit, or raise :class:`BudgetExhausted` taking none."""
        ...

    def release(self, reservation: Reservation) -> None: ...

    def confirm(self, reservation: Reservation) -> None: ...

    def renew(self, reservation: Reservation) -> None:
        """The call is still in flight: restart its reservation's time bound."""
        ...


class BatchReleasing(ErrorBudget, Protocol):
    """A budget that can release many reservations in one round trip
    (:class:`ingest.budget_releases.BackgroundReleases` sends them so)."""

    def release_many(self, reservations: Sequence[Reservation]) -> None: ...


def limits_for(
    settings: Settings, provider: Provider, phone_number_id: str, endpoint: Endpoint
) -> tuple[BudgetLimit, ...]:
    """Every provider error on a number's media GETs counts against its media budget; a
    360dialog lookup also counts against the stricter lookup budget."""
    limits = [BudgetLimit(f"media:{phone_number_id}", settings.error_budget_media)]
    if endpoint == "lookup" and provider is Provider.D360:
        limits.append(
            BudgetLimit(f"lookup:{phone_number_id}", settings.error_budget_lookup_360dialog)
        )
    return tuple(limits)


def in_flight_ttl(settings: Settings) -> float:
    """How long a reservation counts without news from its call: the call's own bound."""
    return min(settings.http_timeout_seconds, settings.lease_seconds)


def reserve_waiting(
    budget: ErrorBudget,
    limits: Sequence[BudgetLimit],
    *,
    max_wait_seconds: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> Reservation:
    """Reserve, waiting up to ``max_wait_seconds`` while the budget is full only because of
    calls in flight (each ends within seconds). A budget spent on confirmed errors raises at
    once: its slots free only as the errors leave the window."""
    deadline = monotonic() + max_wait_seconds
    while True:
        try:
            return budget.reserve(limits)
        except BudgetExhausted as exc:
            remaining = deadline - monotonic()
            if not exc.in_flight or remaining <= 0:
                raise
            # Jittered, so threads waiting on the same number do not retry in lockstep.
            sleep(min(remaining, IN_FLIGHT_RETRY_SECONDS * random.uniform(0.5, 1.0)))


@contextmanager
def guarded(
    budget: ErrorBudget, limits: Sequence[BudgetLimit], *, max_wait_seconds: float = 0.0
) -> Iterator[Reservation]:
    """Reserve around one provider call; confirm on an error response, release otherwise.

    Failing to release or confirm is logged, never raised: the call's result (a transfer
    that succeeded, the provider's own error) is what the attempt must act on.
    """
    reservation = reserve_waiting(budget, limits, max_wait_seconds=max_wait_seconds)
    try:
        yield reservation
    except ProviderError as exc:
        if exc.counts_against_budget:
            _settle(budget.confirm, reservation, "confirm")
        else:
            _settle(budget.release, reservation, "release")
        raise
    except BaseException:
        _settle(budget.release, reservation, "release")
        raise
    _settle(budget.release, reservation, "release")


def _settle(step: Callable[[Reservation], None], reservation: Reservation, name: str) -> None:
    try:
        step(reservation)
    except BudgetUnavailable as exc:
        # Unreleased, the slot frees itself after the in-flight bound; unconfirmed, one error
        # goes uncounted, which the one-short-of-the-threshold margin absorbs.
        log.warning("error budget: could not %s a reservation (%s)", name, exc)


# --- Redis ---------------------------------------------------------------------------------

# KEYS: the budget keys. ARGV: now_ms, window_ms, member, in_flight_retry_ms, in_flight_ttl_ms,
# limit per key. Members are "p:<token>" while in flight (scored when reserved or last
# renewed) and "c:<token>" once confirmed as an error (scored when confirmed).
_RESERVE = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local member = ARGV[3]
local in_flight_retry = tonumber(ARGV[4])
local in_flight_ttl = tonumber(ARGV[5])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  for _, stale in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now - in_flight_ttl)) do
    if string.sub(stale, 1, 2) == 'p:' then redis.call('ZREM', key, stale) end
  end
  if redis.call('ZCARD', key) >= tonumber(ARGV[5 + i]) then
    local free_at = nil
    local in_flight = 0
    local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    for j = 1, #entries, 2 do
      local at
      local pending = 0
      if string.sub(entries[j], 1, 2) == 'c:' then
        at = tonumber(entries[j + 1]) + window
      else
        at = now + in_flight_retry
        pending = 1
      end
      if free_at == nil or at < free_at then
        free_at = at
        in_flight = pending
      end
    end
    return {i, tostring(free_at), in_flight}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, 'p:' .. member)
  redis.call('PEXPIRE', key, window)
end
return {0, '0', 0}
"""

# KEYS: every reservation's keys, one reservation after another. ARGV: for each reservation,
# its token and how many of KEYS are its own.
_RELEASE = """
local k = 1
for i = 1, #ARGV, 2 do
  for _ = 1, tonumber(ARGV[i + 1]) do
    redis.call('ZREM', KEYS[k], 'p:' .. ARGV[i])
    k = k + 1
  end
end
return 0
"""

_RENEW = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, 'p:' .. ARGV[2])
end
return 0
"""

_CONFIRM = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, 'p:' .. ARGV[3])
  redis.call('ZADD', key, now, 'c:' .. ARGV[3])
  redis.call('PEXPIRE', key, window)
end
return 0
"""


class RedisErrorBudget:
    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        window_seconds: float,
        in_flight_ttl_seconds: float,
        clock: Clock = utcnow,
        in_flight_retry_seconds: float = IN_FLIGHT_RETRY_SECONDS,
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:budget:"
        self._window_ms = int(window_seconds * 1000)
        self._clock = clock
        self._in_flight_retry_ms = int(in_flight_retry_seconds * 1000)
        self._in_flight_ttl_ms = int(in_flight_ttl_seconds * 1000)
        self._reserve = redis.register_script(_RESERVE)
        # Release runs after every successful provider call: one script call is one command,
        # cheaper on the client than a pipeline of ZREMs, and it takes many reservations.
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._confirm = redis.register_script(_CONFIRM)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings, **kwargs: Any) -> RedisErrorBudget:
        return cls(
            redis,
            prefix=settings.redis_prefix,
            window_seconds=settings.error_budget_window_seconds,
            in_flight_ttl_seconds=in_flight_ttl(settings),
            **kwargs,
        )

    def reserve(self, limits: Sequence[BudgetLimit]) -> Reservation:
        from redis import RedisError

        token = uuid.uuid4().hex
        keys = [self._prefix + limit.key for limit in limits]
        args: list[Any] = [self._now_ms(), self._window_ms, token, self._in_flight_retry_ms]
        args += [self._in_flight_ttl_ms, *(limit.limit for limit in limits)]
        try:
            index, free_at, in_flight = self._reserve(keys=keys, args=args)
        except RedisError as exc:
            raise BudgetUnavailable(f"redis: {type(exc).__name__}") from exc
        if int(index):
            retry_at = datetime.fromtimestamp(float(free_at) / 1000, tz=UTC)
            raise BudgetExhausted(
                limits[int(index) - 1].key, retry_at, in_flight=bool(int(in_flight))
            )
        return Reservation(token, tuple(limit.key for limit in limits))

    def release(self, reservation: Reservation) -> None:
        self.release_many([reservation])

    def release_many(self, reservations: Sequence[Reservation]) -> None:
        """One script call for all of them. Like :meth:`reserve`'s keys, every key of one
        call must live on one Redis node (no Redis Cluster)."""
        from redis import RedisError

        keys: list[str] = []
        args: list[Any] = []
        for reservation in reservations:
            keys += [self._prefix + key for key in reservation.keys]
            args += [reservation.token, len(reservation.keys)]
        try:
            self._release(keys=keys, args=args)
        except RedisError as exc:
            raise BudgetUnavailable(f"redis: {type(exc).__name__}") from exc

    def renew(self, reservation: Reservation) -> None:
        from redis import RedisError

        keys = [self._prefix + key for key in reservation.keys]
        try:
            # ZADD, not ZADD XX: a reservation that outlived its bound while its call was
            # still alive (a read that stalled just under the timeout) counts again.
            self._renew(keys=keys, args=[self._now_ms(), reservation.token])
        except RedisError as exc:
            raise BudgetUnavailable(f"redis: {type(exc).__name__}") from exc

    def confirm(self, reservation: Reservation) -> None:
        from redis import RedisError

        keys = [self._prefix + key for key in reservation.keys]
        try:
            self._confirm(keys=keys, args=[self._now_ms(), self._window_ms, reservation.token])
        except RedisError as exc:
            raise BudgetUnavailable(f"redis: {type(exc).__name__}") from exc

    def _now_ms(self) -> int:
        return int(self._clock().timestamp() * 1000)


# --- SQL ---------------------------------------------------------------------------------


def _advisory_lock_id(key: str) -> int:
    """A stable signed 64-bit id for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


class SqlErrorBudget:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        window_seconds: float,
        in_flight_ttl_seconds: float,
        clock: Clock = utcnow,
        in_flight_retry_seconds: float = IN_FLIGHT_RETRY_SECONDS,
    ) -> None:
        self._sessions = sessions
        self._window = timedelta(seconds=window_seconds)
        self._in_flight_ttl = timedelta(seconds=in_flight_ttl_seconds)
        self._clock = clock
        self._in_flight_retry = timedelta(seconds=in_flight_retry_seconds)

    @classmethod
    def from_settings(
        cls, sessions: sessionmaker[Session], settings: Settings, **kwargs: Any
    ) -> SqlErrorBudget:
        return cls(
            sessions,
            window_seconds=settings.error_budget_window_seconds,
            in_flight_ttl_seconds=in_flight_ttl(settings),
            **kwargs,
        )

    def reserve(self, limits: Sequence[BudgetLimit]) -> Reservation:
        try:
            with session_scope(self._sessions) as session:
                now = self._clock()
                self._lock(session, [limit.key for limit in limits])
                for limit in limits:
                    self._check(session, limit, now)
                rows = [
                    ErrorBudgetEvent(budget_key=limit.key, occurred_at=now, confirmed=False)
                    for limit in limits
                ]
                session.add_all(rows)
                session.flush()
                ids = tuple(row.id for row in rows)
        except SQLAlchemyError as exc:
            raise BudgetUnavailable(f"sql: {type(exc).__name__}") from exc
        return Reservation(uuid.uuid4().hex, tuple(limit.key for limit in limits), ids)

    def release(self, reservation: Reservation) -> None:
        self.release_many([reservation])

    def release_many(self, reservations: Sequence[Reservation]) -> None:
        row_ids = [row_id for reservation in reservations for row_id in reservation.row_ids]
        try:
            with session_scope(self._sessions) as session:
                session.execute(delete(ErrorBudgetEvent).where(ErrorBudgetEvent.id.in_(row_ids)))
        except SQLAlchemyError as exc:
            raise BudgetUnavailable(f"sql: {type(exc).__name__}") from exc

    def renew(self, reservation: Reservation) -> None:
        try:
            with session_scope(self._sessions) as session:
                session.execute(
                    update(ErrorBudgetEvent)
                    .where(ErrorBudgetEvent.id.in_(reservation.row_ids))
                    .where(ErrorBudgetEvent.confirmed.is_(False))
                    .values(occurred_at=self._clock())
                )
        except SQLAlchemyError as exc:
            raise BudgetUnavailable(f"sql: {type(exc).__name__}") from exc

    def confirm(self, reservation: Reservation) -> None:
        try:
            with session_scope(self._sessions) as session:
                session.execute(
                    update(ErrorBudgetEvent)
                    .where(ErrorBudgetEvent.id.in_(reservation.row_ids))
                    .values(confirmed=True, occurred_at=self._clock())
                )
        except SQLAlchemyError as exc:
            raise BudgetUnavailable(f"sql: {type(exc).__name__}") from exc

    def _lock(self, session: Session, keys: list[str]) -> None:
        # SQLite: every transaction starts with BEGIN IMMEDIATE (ingest.db), one writer at a
        # time. PostgreSQL: a transaction-scoped advisory lock per key, taken in sorted order
        # so two reservations over the same keys cannot deadlock.
        if session.get_bind().dialect.name != "postgresql":
            return
        for key in sorted(set(keys)):
            session.execute(
                text("SELECT pg_advisory_xact_lock(:lock_id)"),
                {"lock_id": _advisory_lock_id("error-budget:" + key)},
            )

    def _check(self, session: Session, limit: BudgetLimit, now: datetime) -> None:
        session.execute(
            delete(ErrorBudgetEvent)
            .where(ErrorBudgetEvent.budget_key == limit.key)
            .where(
                (ErrorBudgetEvent.occurred_at <= now - self._window)
                | (
                    ErrorBudgetEvent.confirmed.is_(False)
                    & (ErrorBudgetEvent.occurred_at <= now - self._in_flight_ttl)
                )
            )
        )
        events = session.execute(
            select(ErrorBudgetEvent.occurred_at, ErrorBudgetEvent.confirmed).where(
                ErrorBudgetEvent.budget_key == limit.key
            )
        ).all()
        if len(events) < limit.limit:
            return
        free_at, in_flight = min(
            ((at + self._window), False) if confirmed else ((now + self._in_flight_retry), True)
            for at, confirmed in events
        )
        raise BudgetExhausted(limit.key, free_at, in_flight=in_flight)


def budget_for(
    settings: Settings, sessions: sessionmaker[Session], redis: Redis | None
) -> BatchReleasing:
    """Redis when configured (shared by every worker machine), SQL otherwise."""
    if redis is not None:
        return RedisErrorBudget.from_settings(redis, settings)
    return SqlErrorBudget.from_settings(sessions, settings)


def count_events(sessions: sessionmaker[Session], key: str) -> int:
    """Events (errors and calls in flight) recorded for ``key``; for checks and tests."""
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(ErrorBudgetEvent)
                .where(ErrorBudgetEvent.budget_key == key)
            )
            or 0
        )
