"""The archive API's per-token rate limit (the seed's ``Global``: 100 requests a minute).

One moving window per token, shared by every web process of a deployment: in Redis when
``INGEST_REDIS_URL`` is set, else in the SQL database that every process already shares
(the embedded default included). A token may carry a limit of its own (``ingest token create
--rate-limit``); the others get ``settings.api_rate_limit``. Limits are written in ``limits``'
notation and read by its ``parse``.

Moving window rather than fixed window: "100 a minute" then holds for every 60 seconds, where
a fixed window lets a client spend 100 at the end of one window and 100 more at the start of
the next (200 in two seconds). Its price is one timestamp per request still in the window
(up to ``limit`` per active token). Timestamps come from the web hosts' clocks, so hosts must
keep NTP time; skew of a second moves one window edge by a second, nothing more.

Redis (:class:`RedisWindow`): ``limits``' ``MovingWindowRateLimiter`` on its ``RedisStorage``,
built on our client's connection pool (no second pool, same timeouts), so fakeredis (whose Lua
runs through lupa) serves the tests and real Redis serves production. Keys are
``<redis_prefix>:api-rate:LIMITER/<token sha256>/<amount>/<multiples>/<period>``.

SQL (:class:`SqlWindow`): ``limits`` has no SQL storage, and its storage interface would have
the strategy count the hit and read the window in two separate calls: two transactions per
request, each a write lock on SQLite. Ours is one transaction per request: take the key's lock
(``BEGIN IMMEDIATE`` on SQLite, see ``ingest.db``; a transaction-scoped advisory lock per key
on PostgreSQL, as the SQL error budget does), count the key's hits in the window, insert one
if there is room, and read when the window frees, all under that lock, so two processes can
never both take the last slot. Rows use ``limits``' key (token hash and limit), never the
token. Hits of quiet tokens are pruned by their ``expires_at``, at most once a
:data:`PRUNE_SECONDS` per process.

Either way a failing store lets requests through with a warning (fail open): the limit
protects capacity, it is not access control, and the lookup that follows needs the database
anyway.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ingest.db import READ_ONLY_OPTION, session_scope
from ingest.models import ApiRateHit, ApiToken

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

KEY_SPACE = "api-rate"
# How often one process deletes the hits that left their window, of every token.
PRUNE_SECONDS = 60.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    # Whole seconds until a request would be allowed again (at least 1) when refused, what
    # ``Retry-After`` says; 0 when allowed.
    retry_after: int
    # When the window next frees a slot (its oldest hit leaves), epoch seconds rounded up:
    # what ``X-RateLimit-Reset`` says.
    reset: int


def parse_limit(value: str) -> RateLimitItem:
    """One limit in ``limits``' notation ("1000/minute", "5 per second"), of at least 1."""
    try:
        items = parse_many(value.strip())
    except ValueError:
        items = []
    if len(items) != 1 or items[0].amount < 1:
        raise ValueError(
            f"invalid rate limit {value!r}: write one limit such as '100/minute' or '5 per second'"
        )
    return items[0]


class Window(Protocol):
    def hit(self, item: RateLimitItem, key: str) -> Decision:
        """Count one request under ``key`` if ``item`` allows it, and say so."""
        ...


def redis_storage(client: Redis, *, prefix: str) -> RedisStorage:
    """``limits``' Redis storage on ``client``'s pool, its keys under ``<prefix>:api-rate``."""
    # The URI only names the scheme: with a pool given, limits builds its client on it.
    return RedisStorage(
        "redis://", connection_pool=client.connection_pool, key_prefix=f"{prefix}:{KEY_SPACE}"
    )


class RedisWindow:
    """``limits``' moving window in Redis: one Lua call to count, one to read the window."""

    def __init__(self, client: Redis, *, prefix: str) -> None:
        self._strategy = MovingWindowRateLimiter(redis_storage(client, prefix=prefix))

    def hit(self, item: RateLimitItem, key: str) -> Decision:
        allowed = self._strategy.hit(item, key)
        stats = self._strategy.get_window_stats(item, key)
        reset = math.ceil(stats.reset_time)
        if allowed:
            return Decision(True, item.amount, stats.remaining, 0, reset)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return Decision(False, item.amount, stats.remaining, retry_after, reset)


def _advisory_lock_id(key: str) -> int:
    """A stable signed 64-bit id for PostgreSQL's advisory locks."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


class SqlWindow:
    """The moving window in ``api_rate_hits``: one transaction per request, locked per key."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._prune_lock = threading.Lock()
        self._next_prune = 0.0

    def hit(self, item: RateLimitItem, key: str) -> Decision:
        rate_key = item.key_for(key)
        period = item.get_expiry()
        now = time.time()
        since = _at(now - period)
        in_window = (ApiRateHit.rate_key == rate_key) & (ApiRateHit.hit_at > since)
        with session_scope(self._sessions) as session:
            postgresql = session.get_bind().dialect.name == "postgresql"
            if postgresql:
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:lock_id)"),
                    {"lock_id": _advisory_lock_id(f"{KEY_SPACE}:{rate_key}")},
                )
            count, oldest = session.execute(
                select(func.count(), func.min(ApiRateHit.hit_at)).where(in_window)
            ).one()
            if count < item.amount:
                session.execute(
                    insert(ApiRateHit).values(
                        rate_key=rate_key, hit_at=_at(now), expires_at=_at(now + period)
                    )
                )
                first = oldest.timestamp() if oldest is not None else now
                decision = Decision(
                    True, item.amount, item.amount - count - 1, 0, math.ceil(first + period)
                )
            else:
                # The slot that frees first is the one that brings the count under the limit
                # (more hits than the limit only after a lower limit was configured).
                frees = session.scalar(
                    select(ApiRateHit.hit_at)
                    .where(in_window)
                    .order_by(ApiRateHit.hit_at)
                    .offset(count - item.amount)
                    .limit(1)
                )
                assert frees is not None
                free_at = frees.timestamp() + period
                decision = Decision(
                    False, item.amount, 0, max(1, math.ceil(free_at - now)), math.ceil(free_at)
                )
            self._prune(session, now, postgresql=postgresql)
        return decision

    def _prune(self, session: Session, now: float, *, postgresql: bool) -> None:
        # In the hit's own transaction: on SQLite it already holds the write lock, so a
        # separate one would only queue behind it. One thread per process tries, and on
        # PostgreSQL one process at a time (two deletes of the same rows could deadlock).
        if now < self._next_prune or not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._next_prune = now + PRUNE_SECONDS
            if postgresql and not session.scalar(
                text("SELECT pg_try_advisory_xact_lock(:lock_id)"),
                {"lock_id": _advisory_lock_id(f"{KEY_SPACE}:prune")},
            ):
                return
            session.execute(delete(ApiRateHit).where(ApiRateHit.expires_at <= _at(now)))
        finally:
            self._prune_lock.release()


class TokenLimits:
    """The limit stored with a token (``api_tokens.rate_limit``), or None for the default.

    Remembered per process for every token found: a token's limit is set when it is created
    and never changes, so nothing remembered goes stale (a revoked token is refused by the
    lookup whatever its limit), and the memory is bounded by the tokens the operator created.
    A hash with no token is asked again each time, so a new token is seen at once.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._known: dict[str, RateLimitItem | None] = {}

    def for_token(self, token_hash: str) -> RateLimitItem | None:
        try:
            return self._known[token_hash]
        except KeyError:
            pass
        try:
            with self._sessions() as session:
                session.connection(execution_options={READ_ONLY_OPTION: True})
                row = session.execute(
                    select(ApiToken.rate_limit).where(ApiToken.token_hash == token_hash)
                ).first()
        except SQLAlchemyError:
            # The lookup that follows meets the same failure and answers for it (503).
            return None
        if row is None:
            return None
        item = None
        if row.rate_limit is not None:
            try:
                item = parse_limit(row.rate_limit)
            except ValueError:
                # Written around `ingest token create`, which validates: keep the default.
                log.warning("api rate limit: a token's stored limit is unreadable; default used")
        self._known[token_hash] = item
        return item


class RateLimiter:
    """``hit(token_hash)`` counts one request and says whether it may proceed."""

    def __init__(self, window: Window, limit: str) -> None:
        self.item: RateLimitItem = parse_limit(limit)
        self._window = window

    @classmethod
    def from_parts(
        cls,
        limit: str,
        *,
        redis: Redis | None,
        prefix: str,
        sessions: sessionmaker[Session],
    ) -> RateLimiter:
        if redis is None:
            return cls(SqlWindow(sessions), limit)
        return cls(RedisWindow(redis, prefix=prefix), limit)

    def hit(self, token_hash: str, item: RateLimitItem | None = None) -> Decision:
        """Count a request of ``token_hash`` against ``item`` (default: the deployment's)."""
        item = item or self.item
        try:
            return self._window.hit(item, token_hash)
        except (RedisError, SQLAlchemyError) as exc:
            # The limit protects the service, it is not an access control: with its store
            # down the API keeps answering (fail open) instead of going down with it.
            log.warning(
                "api rate limit: counter unavailable (%s); request allowed", type(exc).__name__
            )
            return self.unmetered(item)

    def unmetered(self, item: RateLimitItem | None = None) -> Decision:
        """What to say when nothing was counted: the whole limit is left, nothing to wait for."""
        amount = (item or self.item).amount
        return Decision(True, amount, amount, 0, math.ceil(time.time()))
