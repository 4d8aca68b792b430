"""Budget releases sent from a thread of their own: the download never waits for them, they
go several to a round trip, and none is lost at close or to a store that failed once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from ingest.budget_releases import BackgroundReleases
from ingest.error_budget import (
    BudgetExhausted,
    BudgetLimit,
    BudgetUnavailable,
    RedisErrorBudget,
    Reservation,
    guarded,
)

MEDIA = [BudgetLimit("media:1", 3)]


class SlowStore:
    """Records each batch; the first waits for ``go`` (a store that is slow to answer)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.go = threading.Event()
        self.entered = threading.Event()
        self.sent = threading.Condition()
        self._fail_first = fail_first

    def reserve(self, limits: Sequence[BudgetLimit]) -> Reservation:
        raise AssertionError("not used")

    def confirm(self, reservation: Reservation) -> None:
        raise AssertionError("not used")

    def renew(self, reservation: Reservation) -> None:
        raise AssertionError("not used")

    def release(self, reservation: Reservation) -> None:
        raise AssertionError("releases go in batches")

    def release_many(self, reservations: Sequence[Reservation]) -> None:
        first = not self.batches
        if first:
            self.entered.set()
            assert self.go.wait(10)
        with self.sent:
            self.batches.append([r.token for r in reservations])
            self.sent.notify_all()
        if first and self._fail_first:
            raise BudgetUnavailable("redis: ConnectionError")

    def wait_for(self, batches: int) -> None:
        with self.sent:
            assert self.sent.wait_for(lambda: len(self.batches) >= batches, timeout=10)


def reservation(token: str) -> Reservation:
    return Reservation(token, ("media:1",))


def test_a_release_returns_at_once_and_those_waiting_go_together() -> None:
    store = SlowStore()
    releases = BackgroundReleases(store)
    releases.release(reservation("a"))
    assert store.entered.wait(10)  # the thread took it, and waits on the store
    for token in "bcd":
        releases.release(reservation(token))  # the caller never waits for the store
    store.go.set()
    store.wait_for(2)
    assert store.batches == [["a"], ["b", "c", "d"]]
    releases.close()


def test_close_sends_what_waits_and_later_releases_go_straight_to_the_store() -> None:
    store = SlowStore()
    releases = BackgroundReleases(store)
    releases.release(reservation("a"))
    releases.release(reservation("b"))
    store.go.set()
    releases.close()
    assert sorted(token for batch in store.batches for token in batch) == ["a", "b"]
    releases.release(reservation("late"))  # a transfer that ended after the close
    assert store.batches[-1] == ["late"]


def test_a_store_that_fails_is_logged_and_the_next_releases_still_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SlowStore(fail_first=True)
    releases = BackgroundReleases(store)
    with caplog.at_level(logging.WARNING, logger="ingest.budget_releases"):
        releases.release(reservation("lost"))
        store.go.set()
        store.wait_for(1)
        releases.release(reservation("next"))
        store.wait_for(2)
    assert store.batches == [["lost"], ["next"]]
    assert "could not release 1 reservation(s) (redis: ConnectionError)" in caplog.text
    releases.close()


def test_slots_released_in_the_background_free_the_real_budget(
    redis_client: Any, redis_prefix: str
) -> None:
    if type(redis_client).__module__.startswith("fakeredis"):
        pytest.importorskip("lupa", reason="fakeredis runs Lua only with lupa installed")
    budget = RedisErrorBudget(
        redis_client, prefix=redis_prefix, window_seconds=3600, in_flight_ttl_seconds=30
    )
    releases = BackgroundReleases(budget)
    try:
        for _ in range(3):
            with guarded(releases, MEDIA):
                pass  # a call that went well: released in the background
        releases.close()
        # Every slot is free again: three calls fit, a fourth does not.
        held = [releases.reserve(MEDIA) for _ in range(3)]
        with pytest.raises(BudgetExhausted):
            releases.reserve(MEDIA)
        # A confirmed error counts at once, on the caller's thread.
        releases.confirm(held[0])
        key = f"{redis_prefix}:budget:media:1"
        assert redis_client.zscore(key, f"c:{held[0].token}") is not None
    finally:
        for key in redis_client.scan_iter(f"{redis_prefix}:*"):
            redis_client.delete(key)
