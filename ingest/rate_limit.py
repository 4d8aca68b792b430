"""The archive API's per-token rate limit (the seed's ``Global``: 100 requests a minute).

Everything here is the ``limits`` package: ``parse`` reads ``settings.api_rate_limit``, its
``MovingWindowRateLimiter`` decides, and its storages count. This module only picks the
storage, names the keys, and turns the answer into a :class:`Decision`.

Moving window rather than fixed window: "100 a minute" then holds for every 60 seconds, where
a fixed window lets a client spend 100 at the end of one window and 100 more at the start of
the next (200 in two seconds). It also costs fewer Redis round trips: one Lua call to count
the hit and one to read the window (remaining, and the time its oldest hit ages out, which is
the honest ``Retry-After``), where the fixed-window strategy needs three (increment, count,
TTL). Its price is a list of up to ``limit`` timestamps per active token (about 2 KB at 100),
gone a minute after the token's last request. Timestamps come from the web hosts' clocks, so
hosts must keep NTP time; skew of a second moves one window edge by a second, nothing more.

With Redis (``Services.redis``) every web process shares one window per token: ``limits``'
``RedisStorage`` is built on our client's connection pool (no second pool, same timeouts), so
fakeredis (whose Lua runs through lupa) serves the tests and real Redis serves production.
Keys are ``<redis_prefix>:api-rate:LIMITER/<token sha256>/<amount>/<multiples>/<period>``,
never the token itself. If Redis fails, requests are allowed with a warning (fail open).

Without Redis each process counts alone in ``limits``' ``MemoryStorage``, so N processes allow
up to N times the limit. That storage starts a 10 ms expiry timer thread whenever none is
alive, so a request arriving after 10 ms of quiet pays for a thread start. Measured on the
2-core CI machine (loaded), hit plus window read with requests 15 ms apart: median 0.14-0.21
ms, p95 0.2-3 ms, against 0.004 ms for a bare dict; a bare ``threading.Timer`` start alone is
0.11-0.14 ms, so the thread is the whole cost. Kept anyway: it is at most 100 thread starts a
second per process, about 1% of the archive API's own p99 (24 ms in bench/api_bench.py), and
only in Redis-less (single-host) deployments; a hand-written counter to save it is code the
project rule says not to own.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

KEY_SPACE = "api-rate"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    # Whole seconds until a request would be allowed again (at least 1) when refused, what
    # ``Retry-After`` says; 0 when allowed.
    retry_after: int


def redis_storage(client: Redis, *, prefix: str) -> RedisStorage:
    """``limits``' Redis storage on ``client``'s pool, its keys under ``<prefix>:api-rate``."""
    # The URI only names the scheme: with a pool given, limits builds its client on it.
    return RedisStorage(
        "redis://", connection_pool=client.connection_pool, key_prefix=f"{prefix}:{KEY_SPACE}"
    )


class RateLimiter:
    """``hit(token_hash)`` counts one request and says whether it may proceed."""

    def __init__(self, storage: Storage, limit: str) -> None:
        self.item: RateLimitItem = parse(limit)
        self._strategy = MovingWindowRateLimiter(storage)

    @classmethod
    def from_parts(cls, limit: str, *, redis: Redis | None, prefix: str) -> RateLimiter:
        if redis is None:
            return cls(MemoryStorage(), limit)
        return cls(redis_storage(redis, prefix=prefix), limit)

    def hit(self, token_hash: str) -> Decision:
        amount = self.item.amount
        try:
            allowed = self._strategy.hit(self.item, token_hash)
            stats = self._strategy.get_window_stats(self.item, token_hash)
        except RedisError as exc:
            # The limit protects the service, it is not an access control: with Redis down
            # the API keeps answering (fail open) instead of Redis taking the API down too.
            log.warning("api rate limit: counter unavailable (%s); request allowed", exc)
            return Decision(True, amount, amount, 0)
        if allowed:
            return Decision(True, amount, stats.remaining, 0)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return Decision(False, amount, stats.remaining, retry_after)
