"""The archive API's per-token rate limit (the seed's ``Global``: 100 requests a minute).

Counted with the ``limits`` package, fixed window. Every web process shares one counter per
token through Redis when one is configured (``Services.redis``), else each process counts
alone in memory. Keys are built from the token's SHA-256, never from the token.

The Redis storage below is ours rather than ``limits``' own ``RedisStorage``: that one runs
Lua scripts, which fakeredis (our test double) cannot run, and it builds its own client where
we want the process's existing connection pool. A fixed window needs nothing but ``SET NX``,
``INCRBY`` and ``PTTL`` in one ``MULTI``, which every Redis (and fakeredis) runs atomically.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from limits import RateLimitItem, parse
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    # Whole seconds until the window frees (at least 1); what ``Retry-After`` says.
    retry_after: int


class SharedCounterStorage(Storage):
    """A ``limits`` storage on an existing Redis client, with plain commands only.

    Supports the fixed-window strategy (``incr``/``get``/``get_expiry``).
    """

    STORAGE_SCHEME = None

    def __init__(self, client: Redis, *, prefix: str) -> None:
        super().__init__(wrap_exceptions=False)
        self._client = client
        self._prefix = prefix

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return RedisError

    def _key(self, key: str) -> str:
        return f"{self._prefix}:{key}"

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        full = self._key(key)
        with self._client.pipeline(transaction=True) as pipe:
            # The first hit of a window creates the key with its expiry; later hits only
            # count. Both in one MULTI, so a crash between them cannot leave a key that
            # never expires.
            pipe.set(full, 0, ex=max(int(expiry), 1), nx=True)
            pipe.incrby(full, amount)
            results: list[Any] = pipe.execute()
        return int(results[1])

    def get(self, key: str) -> int:
        value = self._client.get(self._key(key))
        return int(value) if value is not None else 0

    def get_expiry(self, key: str) -> float:
        milliseconds = int(self._client.pttl(self._key(key)))
        return time.time() + max(milliseconds, 0) / 1000.0

    def check(self) -> bool:
        try:
            return bool(self._client.ping())
        except RedisError:
            return False

    def reset(self) -> int | None:
        deleted = 0
        for key in self._client.scan_iter(match=f"{self._prefix}:*"):
            deleted += int(self._client.delete(key))
        return deleted

    def clear(self, key: str) -> None:
        self._client.delete(self._key(key))


class LocalCounterStorage(Storage):
    """Fixed-window counters in this process, for deployments without Redis.

    ``limits``' own ``MemoryStorage`` starts a timer thread to expire keys, which costs a
    thread start on many requests; here expiry is checked when a key is read, and expired
    keys are swept now and then.
    """

    STORAGE_SCHEME = None
    SWEEP_EVERY = 1000

    def __init__(self) -> None:
        super().__init__(wrap_exceptions=False)
        self._counters: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._since_sweep = 0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ()

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.monotonic()
        with self._lock:
            count, expires = self._counters.get(key, (0, 0.0))
            if expires <= now:
                count, expires = 0, now + expiry
            count += amount
            self._counters[key] = (count, expires)
            self._since_sweep += 1
            if self._since_sweep >= self.SWEEP_EVERY:
                self._since_sweep = 0
                self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
            return count

    def get(self, key: str) -> int:
        with self._lock:
            count, expires = self._counters.get(key, (0, 0.0))
        return count if expires > time.monotonic() else 0

    def get_expiry(self, key: str) -> float:
        with self._lock:
            _, expires = self._counters.get(key, (0, 0.0))
        # limits expects wall-clock seconds.
        return time.time() + max(expires - time.monotonic(), 0.0)

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            cleared = len(self._counters)
            self._counters.clear()
        return cleared

    def clear(self, key: str) -> None:
        with self._lock:
            self._counters.pop(key, None)


class RateLimiter:
    """``hit(token_hash)`` counts one request and says whether it may proceed."""

    def __init__(self, storage: Storage, limit: str) -> None:
        self.item: RateLimitItem = parse(limit)
        self._storage = storage
        self._strategy = FixedWindowRateLimiter(storage)

    @classmethod
    def from_parts(cls, limit: str, *, redis: Redis | None, prefix: str) -> RateLimiter:
        if redis is None:
            return cls(LocalCounterStorage(), limit)
        return cls(SharedCounterStorage(redis, prefix=f"{prefix}:api-rate"), limit)

    def hit(self, token_hash: str) -> Decision:
        try:
            allowed = self._strategy.hit(self.item, token_hash)
            stats = self._strategy.get_window_stats(self.item, token_hash)
        except RedisError as exc:
            # The limit protects the service, it is not an access control: with Redis down
            # the API keeps answering (fail open) instead of Redis taking the API down too.
            log.warning("api rate limit: counter unavailable (%s); request allowed", exc)
            return Decision(True, self.item.amount, self.item.amount, 0)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed, self.item.amount, stats.remaining, retry_after)
