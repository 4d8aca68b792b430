"""The archive API's per-token limit: one moving window per token, in Redis or in SQL."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import limits.storage.redis
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ingest import accounts, rate_limit
from ingest.db import make_engine, make_session_factory
from ingest.models import ApiRateHit, ApiToken
from ingest.rate_limit import (
    AuthFailureLimiter,
    RateLimiter,
    RedisWindow,
    SqlWindow,
    TokenLimits,
    client_key,
    parse_limit,
)
from tests.factories import make_instance


def unreachable_redis(tmp_path: Path) -> redis.Redis:
    """A client built the way the service builds its own (``from_url``: no retry with
    backoff), on a socket nothing listens on: every command fails at once."""
    return redis.Redis.from_url(f"unix://{tmp_path / 'no-redis.sock'}")


def clear(redis_client: Any, prefix: str) -> None:
    for key in redis_client.keys(f"{prefix}:*"):
        redis_client.delete(key)


def count_hits(sessions: sessionmaker[Session], key_part: str = "") -> int:
    with sessions() as session:
        query = select(func.count()).select_from(ApiRateHit)
        if key_part:
            query = query.where(ApiRateHit.rate_key.contains(key_part))
        return int(session.scalar(query) or 0)


# --- Redis ---------------------------------------------------------------------------------


def test_limiter_counts_per_token_and_shares_through_redis(
    redis_client: Any, redis_prefix: str, sessions: sessionmaker[Session]
) -> None:
    one = RateLimiter.from_parts(
        "3/minute", redis=redis_client, prefix=redis_prefix, sessions=sessions
    )
    two = RateLimiter.from_parts(
        "3/minute", redis=redis_client, prefix=redis_prefix, sessions=sessions
    )
    try:
        decisions = [one.hit("h1"), two.hit("h1"), one.hit("h1"), two.hit("h1")]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert decisions[0].retry_after == 0
        assert 1 <= decisions[-1].retry_after <= 60
        assert one.hit("h2").allowed
        keys = sorted(key.decode() for key in redis_client.keys(f"{redis_prefix}:*"))
        assert [key.split("/")[1] for key in keys] == ["h1", "h2"]
        assert all(key.startswith(f"{redis_prefix}:api-rate:") for key in keys)
        assert all(0 < redis_client.ttl(key) <= 60 for key in keys)
        # With Redis configured, nothing is counted in SQL.
        assert count_hits(sessions) == 0
    finally:
        clear(redis_client, redis_prefix)


def test_limiter_fails_open_with_a_warning_when_redis_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = unreachable_redis(tmp_path)
    limiter = RateLimiter(RedisWindow(down, prefix="p"), "1/minute")
    with caplog.at_level(logging.WARNING, logger="ingest.rate_limit"):
        decisions = [limiter.hit("secret-hash") for _ in range(3)]
    assert all(d.allowed and d.remaining == 1 for d in decisions)
    assert len(caplog.records) == 3
    assert all("request allowed" in r.getMessage() for r in caplog.records)
    down.close()


# --- SQL: the window shared by every process without Redis --------------------------------


def test_without_redis_two_processes_share_one_window_through_sql(
    database_url: str, session_factory_for: Any
) -> None:
    """Each limiter has its own engine, as two web processes would: the limit still holds."""
    one = RateLimiter.from_parts(
        "3/minute", redis=None, prefix="unused", sessions=session_factory_for(database_url)
    )
    two = RateLimiter.from_parts(
        "3/minute", redis=None, prefix="unused", sessions=session_factory_for(database_url)
    )
    decisions = [one.hit("h1"), two.hit("h1"), one.hit("h1"), two.hit("h1"), one.hit("h1")]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
    assert 1 <= decisions[-1].retry_after <= 60
    # Another token has a window of its own.
    assert two.hit("h2").allowed


def test_the_sql_window_holds_under_concurrency(
    database_url: str, session_factory_for: Any
) -> None:
    limiters = [
        RateLimiter(SqlWindow(session_factory_for(database_url)), "10/minute") for _ in range(2)
    ]
    allowed: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def hammer(limiter: RateLimiter) -> None:
        start.wait()
        for _ in range(5):
            decision = limiter.hit("busy")
            with lock:
                allowed.append(decision.allowed)

    threads = [threading.Thread(target=hammer, args=(limiters[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 40
    assert allowed.count(True) == 10


def test_the_sql_window_stores_the_token_hash_never_the_token(
    sessions: sessionmaker[Session],
) -> None:
    limiter = RateLimiter(SqlWindow(sessions), "5/minute")
    digest = accounts.hash_secret("the-token")
    limiter.hit(digest)
    with sessions() as session:
        keys = session.scalars(select(ApiRateHit.rate_key)).all()
    assert keys == [f"LIMITER/{digest}/5/1/minute"]


def test_the_sql_window_fails_open_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'db.sqlite3'}")
    limiter = RateLimiter(SqlWindow(make_session_factory(engine)), "1/minute")
    try:
        with caplog.at_level(logging.WARNING, logger="ingest.rate_limit"):
            decisions = [limiter.hit("h") for _ in range(2)]
    finally:
        engine.dispose()
    assert all(d.allowed and d.remaining == 1 for d in decisions)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    assert all("request allowed" in r.getMessage() for r in caplog.records)


# --- the moving window, hit by hit --------------------------------------------------------


class Clock:
    """Stands in for the ``time`` module where the limiter and its storages read the time."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (rate_limit, limits.storage.redis):
        monkeypatch.setattr(module, "time", clock)
    return clock


def assert_window_moves_hit_by_hit(limiter: RateLimiter, clock: Clock) -> None:
    """A 2/minute limit, hits at 0 s and 30 s."""
    first = limiter.hit("h")
    assert first.allowed
    # The window frees its first slot when that hit is a minute old.
    assert first.reset == 1_000_060
    clock.now += 30
    second = limiter.hit("h")
    assert (second.allowed, second.remaining, second.reset) == (True, 0, 1_000_060)
    clock.now += 29
    refused = limiter.hit("h")
    # Refused until the first hit is a minute old, not until a window boundary.
    assert (refused.allowed, refused.remaining, refused.retry_after) == (False, 0, 1)
    assert refused.reset == 1_000_060
    clock.now += 2
    # Only the first hit left the window: one request fits (at 61 s), and the next waits
    # for the 30 s hit to age out.
    assert limiter.hit("h").allowed
    again = limiter.hit("h")
    assert (again.allowed, again.retry_after, again.reset) == (False, 29, 1_000_090)


def test_limiter_window_moves_hit_by_hit_in_sql(
    clock: Clock, sessions: sessionmaker[Session]
) -> None:
    limiter = RateLimiter.from_parts("2/minute", redis=None, prefix="unused", sessions=sessions)
    assert_window_moves_hit_by_hit(limiter, clock)


def test_limiter_window_moves_hit_by_hit_in_redis(
    clock: Clock, redis_client: Any, redis_prefix: str, sessions: sessionmaker[Session]
) -> None:
    limiter = RateLimiter.from_parts(
        "2/minute", redis=redis_client, prefix=redis_prefix, sessions=sessions
    )
    try:
        assert_window_moves_hit_by_hit(limiter, clock)
    finally:
        clear(redis_client, redis_prefix)


def test_a_failing_counter_still_says_when_the_window_resets(clock: Clock, tmp_path: Path) -> None:
    down = unreachable_redis(tmp_path)
    decision = RateLimiter(RedisWindow(down, prefix="p"), "1/minute").hit("h")
    down.close()
    assert decision.allowed
    assert decision.reset == 1_000_000


def test_hits_of_quiet_tokens_are_pruned(clock: Clock, sessions: sessionmaker[Session]) -> None:
    limiter = RateLimiter(SqlWindow(sessions), "2/minute")
    limiter.hit("quiet")
    limiter.hit("busy")
    assert count_hits(sessions, "quiet") == 1
    clock.now += 60 + rate_limit.PRUNE_SECONDS
    limiter.hit("busy")
    assert count_hits(sessions, "quiet") == 0
    # The busy token's window is what it was: its old hit left, the new one counts.
    assert count_hits(sessions, "busy") == 1


# --- a limit per token ----------------------------------------------------------------------


def test_a_token_s_own_limit_replaces_the_deployment_s(
    clock: Clock, sessions: sessionmaker[Session]
) -> None:
    limiter = RateLimiter(SqlWindow(sessions), "2/minute")
    own = parse_limit("3/minute")
    decisions = [limiter.hit("h", own) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert {d.limit for d in decisions} == {3}
    # The default applies to the others, in a window of its own.
    assert [limiter.hit("other").limit for _ in range(1)] == [2]


@pytest.mark.parametrize("text", ["1000/minute", "5 per second", "10/2 minutes", " 7/hour "])
def test_parse_limit_accepts_one_positive_limit(text: str) -> None:
    assert parse_limit(text).amount >= 1


@pytest.mark.parametrize("text", ["", "abc", "0/minute", "1/second;10/minute", "100"])
def test_parse_limit_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        parse_limit(text)


def test_token_limits_come_from_the_token_row(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        shop = make_instance(session)
        shop_account = shop.account_id
        fast = accounts.create_token(session, instance=shop.name, rate_limit="1000/minute")
        plain = accounts.create_token(session, instance=shop.name)
    limits_of = TokenLimits(sessions)
    item = limits_of.for_token(accounts.hash_secret(fast))
    assert item is not None and (item.amount, item.get_expiry()) == (1000, 60)
    assert limits_of.for_token(accounts.hash_secret(plain)) is None
    # An unknown token gets the default, and is not remembered as unknown: a token created
    # a moment later is seen at once.
    later = accounts.hash_secret("not-yet-created")
    assert limits_of.for_token(later) is None
    with sessions.begin() as session:
        session.add(ApiToken(token_hash=later, account_id=shop_account, rate_limit="9/hour"))
    item = limits_of.for_token(later)
    assert item is not None and item.amount == 9


def test_token_limits_know_found_tokens_and_forget_revoked_ones(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        shop = make_instance(session)
        token = accounts.create_token(session, instance=shop.name, rate_limit="7/minute")
    digest = accounts.hash_secret(token)
    tokens = TokenLimits(sessions)
    assert not tokens.known(digest)
    assert tokens.lookup(accounts.hash_secret("a-guess")) is False
    assert tokens.lookup(digest) is True
    assert tokens.known(digest)
    limit = tokens.limit_of(digest)
    assert limit is not None and limit.amount == 7
    tokens.forget(digest)
    assert not tokens.known(digest)
    assert tokens.limit_of(digest) is None


# --- peeking: what the failed-authentication gate asks before a lookup ---------------------


def assert_peek_counts_nothing(window: Any) -> None:
    item = parse_limit("2/minute")
    for _ in range(3):
        decision = window.peek(item, "k")
        assert (decision.allowed, decision.remaining) == (True, 2)
    assert window.hit(item, "k").allowed
    assert window.peek(item, "k").remaining == 1
    assert window.hit(item, "k").allowed
    refused = window.peek(item, "k")
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert 1 <= refused.retry_after <= 60
    # The refusal says when the oldest hit leaves, as a refused hit would.
    assert refused.reset == window.hit(item, "k").reset


def test_peek_counts_nothing_in_sql(sessions: sessionmaker[Session]) -> None:
    assert_peek_counts_nothing(SqlWindow(sessions))
    assert count_hits(sessions) == 2


def test_peek_counts_nothing_in_redis(redis_client: Any, redis_prefix: str) -> None:
    try:
        assert_peek_counts_nothing(RedisWindow(redis_client, prefix=redis_prefix))
    finally:
        clear(redis_client, redis_prefix)


# --- failed authentications ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        (None, "unknown"),
        ("", "unknown"),
        ("not an address", "unknown"),
    ],
)
def test_client_key(address: str | None, key: str) -> None:
    assert client_key(address) == key


def assert_failures_are_limited_per_client_and_overall(
    failures: AuthFailureLimiter, clock: Clock
) -> None:
    """2 a minute per client, 3 a minute in all."""
    assert failures.refusal("192.0.2.1") is None
    first = failures.fail("192.0.2.1")
    assert (first.allowed, first.limit, first.remaining) == (True, 2, 1)
    # Asking counts nothing.
    for _ in range(5):
        assert failures.refusal("192.0.2.1") is None
    clock.now += 10
    assert failures.fail("192.0.2.1").remaining == 0
    refused = failures.refusal("192.0.2.1")
    assert refused is not None
    assert (refused.allowed, refused.limit, refused.retry_after) == (False, 2, 50)
    assert refused.reset == 1_000_060
    # Another client has failures of its own...
    assert failures.refusal("192.0.2.2") is None
    failures.fail("192.0.2.2")
    # ... until the deployment has spent its three: then every client is refused.
    everyone = failures.refusal("192.0.2.3")
    assert everyone is not None and everyone.limit == 3
    # The window moves: a minute after the first failure, one is free again.
    clock.now += 51
    assert failures.refusal("192.0.2.3") is None
    assert failures.refusal("192.0.2.1") is None


def test_failures_are_limited_per_client_and_overall_in_sql(
    clock: Clock, sessions: sessionmaker[Session]
) -> None:
    failures = AuthFailureLimiter.from_parts(
        per_client="2/minute", overall="3/minute", redis=None, prefix="unused", sessions=sessions
    )
    assert_failures_are_limited_per_client_and_overall(failures, clock)
    with sessions() as session:
        keys = set(session.scalars(select(ApiRateHit.rate_key)))
    assert keys == {
        "LIMITER/auth-failure:client:192.0.2.1/2/1/minute",
        "LIMITER/auth-failure:client:192.0.2.2/2/1/minute",
        "LIMITER/auth-failure:all/3/1/minute",
    }


def test_failures_are_limited_per_client_and_overall_in_redis(
    clock: Clock, redis_client: Any, redis_prefix: str, sessions: sessionmaker[Session]
) -> None:
    failures = AuthFailureLimiter.from_parts(
        per_client="2/minute",
        overall="3/minute",
        redis=redis_client,
        prefix=redis_prefix,
        sessions=sessions,
    )
    try:
        assert_failures_are_limited_per_client_and_overall(failures, clock)
        keys = {key.decode() for key in redis_client.keys(f"{redis_prefix}:*")}
        assert keys == {
            f"{redis_prefix}:auth-failures:LIMITER/auth-failure:client:192.0.2.1/2/1/minute",
            f"{redis_prefix}:auth-failures:LIMITER/auth-failure:client:192.0.2.2/2/1/minute",
            f"{redis_prefix}:auth-failures:LIMITER/auth-failure:all/3/1/minute",
        }
        assert count_hits(sessions) == 0
    finally:
        clear(redis_client, redis_prefix)


def test_failure_limits_fail_open_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = unreachable_redis(tmp_path)
    failures = AuthFailureLimiter(RedisWindow(down, prefix="p"), "1/minute", "1/minute")
    with caplog.at_level(logging.WARNING, logger="ingest.rate_limit"):
        assert failures.refusal("192.0.2.1") is None
        decision = failures.fail("192.0.2.1")
    down.close()
    assert (decision.allowed, decision.remaining) == (True, 1)
    assert caplog.records and all("unavailable" in r.getMessage() for r in caplog.records)


def test_spending_the_last_failure_is_logged_once(
    clock: Clock, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    failures = AuthFailureLimiter(SqlWindow(sessions), "2/minute", "100/minute")
    with caplog.at_level(logging.WARNING, logger="ingest.rate_limit"):
        for _ in range(5):
            failures.fail("192.0.2.1")
    assert [r.getMessage() for r in caplog.records] == [
        "auth failure limit: client 192.0.2.1 spent its 2 failed authentications; "
        "refused without a lookup for 60 s"
    ]
