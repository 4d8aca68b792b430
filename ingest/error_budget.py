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
limit, whatever the concurrency. A reservation left behind by a crashed worker counts until
it leaves the window: the safe side.

Two backends with the same rules: :class:`RedisErrorBudget` (a sorted set per key, checked
and updated by one Lua script, so the check and the reservation are atomic across processes)
and :class:`SqlErrorBudget` (rows in ``error_budget_events``, serialised per key by an
advisory lock on PostgreSQL and by SQLite's single writer).
"""

from __future__ import annotations

import hashlib
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

Clock = Callable[[], datetime]

# When a budget is full only because of calls still in flight, a slot is likely to free as
# soon as one of them ends: look again after this long rather than a whole window later.
IN_FLIGHT_RETRY_SECONDS = 30.0


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
    """The number's budget is spent: do not call the provider before ``retry_at``."""

    def __init__(self, key: str, retry_at: datetime) -> None:
        super().__init__(f"error budget {key} is spent until {retry_at.isoformat()}")
        self.key = key
        self.retry_at = retry_at


class BudgetUnavailable(Exception):
    """The budget's store (Redis or SQL) failed: no provider call may be made unguarded."""


class ErrorBudget(Protocol):
    def reserve(self, limits: Sequence[BudgetLimit]) -> Reservation:
        """Take one slot in every limit, or raise :class:`BudgetExhausted` taking none."""
        ...

    def release(self, reservation: Reservation) -> None: ...

    def confirm(self, reservation: Reservation) -> None: ...


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


@contextmanager
def guarded(budget: ErrorBudget, limits: Sequence[BudgetLimit]) -> Iterator[None]:
    """Reserve around one provider call; confirm on an error response, release otherwise."""
    reservation = budget.reserve(limits)
    try:
        yield
    except ProviderError as exc:
        if exc.counts_against_budget:
            budget.confirm(reservation)
        else:
            budget.release(reservation)
        raise
    except BaseException:
        budget.release(reservation)
        raise
    budget.release(reservation)


# --- Redis ---------------------------------------------------------------------------------

# KEYS: the budget keys. ARGV: now_ms, window_ms, member, in_flight_retry_ms, limit per key.
# Members are "p:<token>" while in flight and "c:<token>" once confirmed as an error.
_RESERVE = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local member = ARGV[3]
local in_flight_retry = tonumber(ARGV[4])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= tonumber(ARGV[4 + i]) then
    local free_at = nil
    local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    for j = 1, #entries, 2 do
      local at
      if string.sub(entries[j], 1, 2) == 'c:' then
        at = tonumber(entries[j + 1]) + window
      else
        at = now + in_flight_retry
      end
      if free_at == nil or at < free_at then free_at = at end
    end
    return {i, tostring(free_at)}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, 'p:' .. member)
  redis.call('PEXPIRE', key, window)
end
return {0, '0'}
"""

_RELEASE = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, 'p:' .. ARGV[1])
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
        clock: Clock = utcnow,
        in_flight_retry_seconds: float = IN_FLIGHT_RETRY_SECONDS,
    ) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:budget:"
        self._window_ms = int(window_seconds * 1000)
        self._clock = clock
        self._in_flight_retry_ms = int(in_flight_retry_seconds * 1000)
        self._reserve = redis.register_script(_RESERVE)
        # Release runs after every successful provider call: one script call is one command,
        # cheaper on the client than a pipeline of ZREMs.
        self._release = redis.register_script(_RELEASE)
        self._confirm = redis.register_script(_CONFIRM)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings, **kwargs: Any) -> RedisErrorBudget:
        return cls(
            redis,
            prefix=settings.redis_prefix,
            window_seconds=settings.error_budget_window_seconds,
            **kwargs,
        )

    def reserve(self, limits: Sequence[BudgetLimit]) -> Reservation:
        from redis import RedisError

        token = uuid.uuid4().hex
        keys = [self._prefix + limit.key for limit in limits]
        args: list[Any] = [self._now_ms(), self._window_ms, token, self._in_flight_retry_ms]
        args += [limit.limit for limit in limits]
        try:
            index, free_at = self._reserve(keys=keys, args=args)
        except RedisError as exc:
            raise BudgetUnavailable(f"redis: {type(exc).__name__}") from exc
        if int(index):
            retry_at = datetime.fromtimestamp(float(free_at) / 1000, tz=UTC)
            raise BudgetExhausted(limits[int(index) - 1].key, retry_at)
        return Reservation(token, tuple(limit.key for limit in limits))

    def release(self, reservation: Reservation) -> None:
        from redis import RedisError

        keys = [self._prefix + key for key in reservation.keys]
        try:
            self._release(keys=keys, args=[reservation.token])
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
        clock: Clock = utcnow,
        in_flight_retry_seconds: float = IN_FLIGHT_RETRY_SECONDS,
    ) -> None:
        self._sessions = sessions
        self._window = timedelta(seconds=window_seconds)
        self._clock = clock
        self._in_flight_retry = timedelta(seconds=in_flight_retry_seconds)

    @classmethod
    def from_settings(
        cls, sessions: sessionmaker[Session], settings: Settings, **kwargs: Any
    ) -> SqlErrorBudget:
        return cls(sessions, window_seconds=settings.error_budget_window_seconds, **kwargs)

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
        try:
            with session_scope(self._sessions) as session:
                session.execute(
                    delete(ErrorBudgetEvent).where(ErrorBudgetEvent.id.in_(reservation.row_ids))
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
        horizon = now - self._window
        session.execute(
            delete(ErrorBudgetEvent)
            .where(ErrorBudgetEvent.budget_key == limit.key)
            .where(ErrorBudgetEvent.occurred_at <= horizon)
        )
        events = session.execute(
            select(ErrorBudgetEvent.occurred_at, ErrorBudgetEvent.confirmed).where(
                ErrorBudgetEvent.budget_key == limit.key
            )
        ).all()
        if len(events) < limit.limit:
            return
        free_at = min(
            (at + self._window) if confirmed else (now + self._in_flight_retry)
            for at, confirmed in events
        )
        raise BudgetExhausted(limit.key, free_at)


def budget_for(
    settings: Settings, sessions: sessionmaker[Session], redis: Redis | None
) -> ErrorBudget:
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
