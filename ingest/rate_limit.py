"""The archive API's per-token rate limit (the seed's ``Global``: 100 requests a minute), and
the limit on failed authentications (:class:`AuthFailureLimiter`).

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

Failed authentications (:class:`AuthFailureLimiter`) are counted in the same storage, per
client address and for the whole deployment, so that guessing tokens costs the guesser and
not the database: the API asks :meth:`AuthFailureLimiter.refusal` (a read, nothing counted)
before it looks a token up, and counts a failure only when the token turns out not to exist.
Its keys name the client address (an IPv6 address by its /64, the smallest network one
subscriber is given), never a token.

Why one module of this size: both storages implement one rule (the moving window) and the
authentication-failure limit shares them; the SQL window's locking is explained once, here.
"""

from __future__ import annotations

import hashlib
import ipaddress
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
# Failed authentications live apart from the tokens' windows (in Redis; in SQL their keys
# start with AUTH_FAILURE_KEY, which no token hash does).
AUTH_FAILURE_KEY_SPACE = "auth-failures"
AUTH_FAILURE_KEY = "auth-failure"
# How often one process deletes the hits that left their window, of every token.
PRUNE_SECONDS = 60.0


@dataclass(frozen=True)
class Allowance:
    """What one request may do under its limit, and the figures its answer's headers carry
    (``ingest.retry_policy.Decision`` is the other kind of decision: a download's next state)."""

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
    def hit(self, item: RateLimitItem, key: str) -> Allowance:
        """Count one request under ``key`` if ``item`` allows it, and say so."""
        ...

    def peek(self, item: RateLimitItem, key: str) -> Allowance:
        """Whether ``item`` would allow one more request under ``key``; counts nothing."""
        ...


def redis_storage(client: Redis, *, prefix: str, key_space: str = KEY_SPACE) -> RedisStorage:
    """``limits``' Redis storage on ``client``'s pool, its keys under ``<prefix>:<key_space>``."""
    # The URI only names the scheme: with a pool given, limits builds its client on it.
    return RedisStorage(
        "redis://", connection_pool=client.connection_pool, key_prefix=f"{prefix}:{key_space}"
    )


class RedisWindow:
    """``limits``' moving window in Redis: one Lua call to count, one to read the window."""

    def __init__(self, client: Redis, *, prefix: str, key_space: str = KEY_SPACE) -> None:
        self._strategy = MovingWindowRateLimiter(
            redis_storage(client, prefix=prefix, key_space=key_space)
        )

    def hit(self, item: RateLimitItem, key: str) -> Allowance:
        allowed = self._strategy.hit(item, key)
        return self._decision(item, key, allowed=allowed)

    def peek(self, item: RateLimitItem, key: str) -> Allowance:
        return self._decision(item, key, allowed=None)

    def _decision(self, item: RateLimitItem, key: str, *, allowed: bool | None) -> Allowance:
        stats = self._strategy.get_window_stats(item, key)
        remaining = max(0, stats.remaining)
        if allowed is None:
            allowed = remaining > 0
        reset = math.ceil(stats.reset_time)
        if allowed:
            return Allowance(True, item.amount, remaining, 0, reset)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return Allowance(False, item.amount, remaining, retry_after, reset)


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

    def hit(self, item: RateLimitItem, key: str) -> Allowance:
        rate_key = item.key_for(key)
        now = time.time()
        with session_scope(self._sessions) as session:
            postgresql = session.get_bind().dialect.name == "postgresql"
            if postgresql:
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:lock_id)"),
                    {"lock_id": _advisory_lock_id(f"{KEY_SPACE}:{rate_key}")},
                )
            decision = self._decide(session, item, rate_key, now, count_hit=True)
            self._prune(session, now, postgresql=postgresql)
        return decision

    def peek(self, item: RateLimitItem, key: str) -> Allowance:
        # A read: no lock, and on SQLite a deferred transaction that never waits for writers.
        with self._sessions() as session:
            session.connection(execution_options={READ_ONLY_OPTION: True})
            return self._decide(session, item, item.key_for(key), time.time(), count_hit=False)

    def _decide(
        self, session: Session, item: RateLimitItem, rate_key: str, now: float, *, count_hit: bool
    ) -> Allowance:
        period = item.get_expiry()
        in_window = (ApiRateHit.rate_key == rate_key) & (ApiRateHit.hit_at > _at(now - period))
        count, oldest = session.execute(
            select(func.count(), func.min(ApiRateHit.hit_at)).where(in_window)
        ).one()
        if count < item.amount:
            if count_hit:
                session.execute(
                    insert(ApiRateHit).values(
                        rate_key=rate_key, hit_at=_at(now), expires_at=_at(now + period)
                    )
                )
            first = oldest.timestamp() if oldest is not None else now
            remaining = item.amount - count - (1 if count_hit else 0)
            return Allowance(True, item.amount, remaining, 0, math.ceil(first + period))
        # The slot that frees first is the one that brings the count under the limit (more
        # hits than the limit only after a lower limit was configured).
        frees = session.scalar(
            select(ApiRateHit.hit_at)
            .where(in_window)
            .order_by(ApiRateHit.hit_at)
            .offset(count - item.amount)
            .limit(1)
        )
        assert frees is not None
        free_at = frees.timestamp() + period
        return Allowance(
            False, item.amount, 0, max(1, math.ceil(free_at - now)), math.ceil(free_at)
        )

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
    """Which token hashes exist, and the limit stored with each (``api_tokens.rate_limit``).

    Remembered per process for every token found: a token's limit is set when it is created
    and never changes, so nothing remembered goes stale (a revoked token is refused by the
    lookup whatever its limit, and then forgotten here), and the memory is bounded by the
    tokens the operator created. A hash with no token is asked again each time, so a new
    token is seen at once; the API asks only while the client may still fail
    (:class:`AuthFailureLimiter`), so guessing cannot turn this into a query per request.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._known: dict[str, RateLimitItem | None] = {}

    def known(self, token_hash: str) -> bool:
        """A token with this hash was found by this process (it may since have been revoked)."""
        return token_hash in self._known

    def lookup(self, token_hash: str) -> bool | None:
        """Whether a token with this hash exists (remembered if so); None if the database
        cannot say."""
        if token_hash in self._known:
            return True
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
            return False
        item = None
        if row.rate_limit is not None:
            try:
                item = parse_limit(row.rate_limit)
            except ValueError:
                # Written around `ingest token create`, which validates: keep the default.
                log.warning("api rate limit: a token's stored limit is unreadable; default used")
        self._known[token_hash] = item
        return True

    def limit_of(self, token_hash: str) -> RateLimitItem | None:
        """The remembered limit of a token found before; None: the deployment's."""
        return self._known.get(token_hash)

    def forget(self, token_hash: str) -> None:
        """The token was refused (revoked): the next request is gated and looked up again."""
        self._known.pop(token_hash, None)

    def for_token(self, token_hash: str) -> RateLimitItem | None:
        """The token's own limit, or None for the deployment's (unknown tokens included)."""
        self.lookup(token_hash)
        return self._known.get(token_hash)


def window_for(
    *,
    redis: Redis | None,
    prefix: str,
    sessions: sessionmaker[Session],
    key_space: str = KEY_SPACE,
) -> Window:
    """Redis when the deployment has it, else the SQL database every process shares."""
    if redis is None:
        return SqlWindow(sessions)
    return RedisWindow(redis, prefix=prefix, key_space=key_space)


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
        return cls(window_for(redis=redis, prefix=prefix, sessions=sessions), limit)

    def hit(self, token_hash: str, item: RateLimitItem | None = None) -> Allowance:
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

    def unmetered(self, item: RateLimitItem | None = None) -> Allowance:
        """What to say when nothing was counted: the whole limit is left, nothing to wait for."""
        amount = (item or self.item).amount
        return Allowance(True, amount, amount, 0, math.ceil(time.time()))


def client_key(address: str | None) -> str:
    """The client a failed authentication is charged to: its address, an IPv6 one by its /64.

    One IPv6 subscriber holds a whole /64 (2^64 addresses), so per address it could guess
    without end; an IPv4-mapped address counts as the IPv4 one. Anything that is not an
    address (a Unix socket has none) is one client, ``unknown``.
    """
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthFailureLimiter:
    """Failed authentications, per client address and for the whole deployment.

    :meth:`refusal` is asked before a credential is looked up and counts nothing, so a
    request that authenticates never spends the budget; :meth:`fail` counts one failure
    once the credential is known to be wrong. Requests of one client that run at the same
    moment can all pass the check before any of them is counted, so a client may exceed its
    limit by the requests it has in flight (bounded by the web threads); every later one is
    refused without a lookup until the window frees. The deployment-wide limit bounds what a
    guesser spread over many addresses costs the database.
    """

    def __init__(self, window: Window, per_client: str, overall: str) -> None:
        self.per_client: RateLimitItem = parse_limit(per_client)
        self.overall: RateLimitItem = parse_limit(overall)
        self._window = window

    @classmethod
    def from_parts(
        cls,
        *,
        per_client: str,
        overall: str,
        redis: Redis | None,
        prefix: str,
        sessions: sessionmaker[Session],
    ) -> AuthFailureLimiter:
        window = window_for(
            redis=redis, prefix=prefix, sessions=sessions, key_space=AUTH_FAILURE_KEY_SPACE
        )
        return cls(window, per_client, overall)

    def _windows(self, client: str) -> list[tuple[RateLimitItem, str]]:
        return [
            (self.per_client, f"{AUTH_FAILURE_KEY}:client:{client}"),
            (self.overall, f"{AUTH_FAILURE_KEY}:all"),
        ]

    def refusal(self, address: str | None) -> Allowance | None:
        """The refusal if ``address`` (or the deployment) has spent its failures, else None."""
        client = client_key(address)
        for item, key in self._windows(client):
            try:
                decision = self._window.peek(item, key)
            except (RedisError, SQLAlchemyError) as exc:
                # As for the API limit: a store outage must not take the API down with it.
                log.warning(
                    "auth failure limit: counter unavailable (%s); request allowed",
                    type(exc).__name__,
                )
                continue
            if not decision.allowed:
                return decision
        return None

    def fail(self, address: str | None) -> Allowance:
        """Count one failed authentication of ``address``; its own window as it now stands."""
        client = client_key(address)
        decisions: list[Allowance] = []
        for item, key in self._windows(client):
            try:
                decisions.append(self._window.hit(item, key))
            except (RedisError, SQLAlchemyError) as exc:
                log.warning(
                    "auth failure limit: counter unavailable (%s); failure not counted",
                    type(exc).__name__,
                )
                decisions.append(
                    Allowance(True, item.amount, item.amount, 0, math.ceil(time.time()))
                )
        own = decisions[0]
        if own.allowed and own.remaining == 0:
            # Once per window and client, not once per refused request: a flood of guesses
            # must not become a flood of log lines.
            log.warning(
                "auth failure limit: client %s spent its %d failed authentications; "
                "refused without a lookup for %d s",
                client,
                own.limit,
                max(1, own.reset - math.ceil(time.time())),
            )
        return own
