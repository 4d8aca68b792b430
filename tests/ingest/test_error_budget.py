"""The error budget's contract, run against Redis (fakeredis and real) and SQL (SQLite, PG)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from ingest.error_budget import (
    BatchReleasing,
    BudgetExhausted,
    BudgetLimit,
    BudgetUnavailable,
    RedisErrorBudget,
    SqlErrorBudget,
    budget_for,
    count_events,
    guarded,
    limits_for,
    reserve_waiting,
)
from ingest.models import Provider, utcnow
from ingest.providers import ProviderRejected, ProviderUnavailable

WINDOW = 3600.0
IN_FLIGHT_TTL = 30.0
Factory = Callable[[], BatchReleasing]


class FakeClock:
    def __init__(self) -> None:
        self.now = utcnow()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class BudgetContract:
    """Shared by every backend; subclasses provide ``make``."""

    def test_reserves_up_to_the_limit_then_refuses(self, make: Factory) -> None:
        budget = make()
        limit = [BudgetLimit("media:1", 3)]
        held = [budget.reserve(limit) for _ in range(3)]
        with pytest.raises(BudgetExhausted) as refused:
            budget.reserve(limit)
        assert refused.value.key == "media:1"
        budget.release(held[0])
        budget.reserve(limit)  # a released slot is free again

    def test_confirmed_errors_count_until_they_leave_the_window(
        self, make: Factory, clock: FakeClock
    ) -> None:
        budget = make()
        limit = [BudgetLimit("media:2", 2)]
        first_at = clock()
        budget.confirm(budget.reserve(limit))
        clock.advance(600)
        budget.confirm(budget.reserve(limit))
        with pytest.raises(BudgetExhausted) as refused:
            budget.reserve(limit)
        # The oldest error leaves the window first (confirmed at first_at).
        assert (
            abs((refused.value.retry_at - (first_at + timedelta(seconds=WINDOW))).total_seconds())
            < 1
        )
        clock.advance(WINDOW - 600 + 1)
        budget.reserve(limit)  # the number resumes by itself
        with pytest.raises(BudgetExhausted):
            budget.reserve(limit)

    def test_many_reservations_are_released_in_one_call(self, make: Factory) -> None:
        budget = make()
        media, lookup = BudgetLimit("media:many", 3), BudgetLimit("lookup:many", 1)
        held = [budget.reserve([media, lookup]), budget.reserve([media]), budget.reserve([media])]
        with pytest.raises(BudgetExhausted):
            budget.reserve([media])
        budget.release_many(held[:2])
        budget.reserve([media, lookup])  # every key of the first reservation is free again
        budget.reserve([media])
        with pytest.raises(BudgetExhausted):  # and only the two released slots
            budget.reserve([media])
        budget.release_many([])  # nothing to send is not an error

    def test_a_budget_full_of_calls_in_flight_is_retried_soon(
        self, make: Factory, clock: FakeClock
    ) -> None:
        budget = make()
        limit = [BudgetLimit("media:3", 1)]
        budget.reserve(limit)
        with pytest.raises(BudgetExhausted) as refused:
            budget.reserve(limit)
        assert refused.value.retry_at - clock() <= timedelta(minutes=1)

    def test_a_full_budget_says_whether_calls_in_flight_or_errors_hold_it(
        self, make: Factory
    ) -> None:
        budget = make()
        budget.reserve([BudgetLimit("media:held", 1)])
        with pytest.raises(BudgetExhausted) as in_flight:
            budget.reserve([BudgetLimit("media:held", 1)])
        assert in_flight.value.in_flight
        budget.confirm(budget.reserve([BudgetLimit("media:spent", 1)]))
        with pytest.raises(BudgetExhausted) as spent:
            budget.reserve([BudgetLimit("media:spent", 1)])
        assert not spent.value.in_flight

    def test_a_reservation_nobody_settles_stops_counting_after_its_bound(
        self, make: Factory, clock: FakeClock
    ) -> None:
        """A worker killed mid-call never releases; its slot frees after the call's bound,
        not after the hour-long window."""
        budget = make()
        limit = [BudgetLimit("media:killed", 2)]
        budget.reserve(limit)
        budget.reserve(limit)
        with pytest.raises(BudgetExhausted):
            budget.reserve(limit)
        clock.advance(IN_FLIGHT_TTL + 1)
        budget.reserve(limit)
        budget.reserve(limit)

    def test_renewing_keeps_a_long_call_counted(self, make: Factory, clock: FakeClock) -> None:
        budget = make()
        limit = [BudgetLimit("media:long", 1)]
        reservation = budget.reserve(limit)
        for _ in range(3):
            clock.advance(IN_FLIGHT_TTL * 0.6)
            budget.renew(reservation)
        with pytest.raises(BudgetExhausted):
            budget.reserve(limit)

    def test_confirmed_errors_outlive_the_in_flight_bound(
        self, make: Factory, clock: FakeClock
    ) -> None:
        budget = make()
        limit = [BudgetLimit("media:errors", 1)]
        budget.confirm(budget.reserve(limit))
        clock.advance(IN_FLIGHT_TTL * 3)
        with pytest.raises(BudgetExhausted):
            budget.reserve(limit)

    def test_numbers_do_not_share_a_budget(self, make: Factory) -> None:
        budget = make()
        for _ in range(2):
            budget.confirm(budget.reserve([BudgetLimit("media:blocked", 2)]))
        with pytest.raises(BudgetExhausted):
            budget.reserve([BudgetLimit("media:blocked", 2)])
        budget.reserve([BudgetLimit("media:healthy", 2)])

    def test_a_refused_multi_key_reservation_takes_no_slot(self, make: Factory) -> None:
        budget = make()
        budget.confirm(budget.reserve([BudgetLimit("lookup:9", 1)]))
        with pytest.raises(BudgetExhausted) as refused:
            budget.reserve([BudgetLimit("media:9", 2), BudgetLimit("lookup:9", 1)])
        assert refused.value.key == "lookup:9"
        # media:9 still has both slots.
        budget.reserve([BudgetLimit("media:9", 2)])
        budget.reserve([BudgetLimit("media:9", 2)])

    def test_guarded_confirms_error_responses_and_releases_everything_else(
        self, make: Factory
    ) -> None:
        budget = make()
        limit = [BudgetLimit("media:4", 2)]
        with pytest.raises(ProviderRejected), guarded(budget, limit):
            raise ProviderRejected("bad request", endpoint="lookup", status=400)
        with pytest.raises(ProviderUnavailable), guarded(budget, limit):
            raise ProviderUnavailable("timeout", endpoint="download", counts_against_budget=False)
        with pytest.raises(KeyError), guarded(budget, limit):
            raise KeyError("a bug, not a provider error")
        for _ in range(3):
            with guarded(budget, limit):
                pass
        with guarded(budget, limit):  # one error counted: one slot left
            pass
        budget.reserve(limit)
        with pytest.raises(BudgetExhausted):
            budget.reserve(limit)

    def test_threads_in_parallel_never_exceed_the_budget(self, make: Factory) -> None:
        """Every call may fail; however the threads interleave, at most `limit` errors."""
        budget = make()
        limit = [BudgetLimit("media:threads", 5)]
        errors = 0
        in_flight = 0
        peak = 0
        lock = threading.Lock()
        start = threading.Barrier(8)

        def worker(seed: int) -> None:
            nonlocal errors, in_flight, peak
            rng = random.Random(seed)
            start.wait()
            for _ in range(15):
                try:
                    reservation = budget.reserve(limit)
                except BudgetExhausted:
                    continue
                with lock:
                    in_flight += 1
                    peak = max(peak, in_flight)
                failed = rng.random() < 0.5
                with lock:
                    in_flight -= 1
                    if failed:
                        errors += 1
                if failed:
                    budget.confirm(reservation)
                else:
                    budget.release(reservation)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == 5  # the budget was used up, never overrun
        assert peak <= 5


class _StoreDownOnSettle:
    """A budget whose store fails after the reservation (Redis blipped mid-transfer)."""

    def __init__(self) -> None:
        self.reserved = 0

    def reserve(self, limits: Any) -> Any:
        self.reserved += 1
        return object()

    def release(self, reservation: Any) -> None:
        raise BudgetUnavailable("redis: ConnectionError")

    confirm = release

    def renew(self, reservation: Any) -> None:
        raise BudgetUnavailable("redis: ConnectionError")


def test_a_failed_release_never_undoes_a_successful_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = _StoreDownOnSettle()
    finished = False
    with guarded(budget, [BudgetLimit("media:1", 3)]):
        finished = True
    assert finished
    assert "could not release" in caplog.text


def test_a_failed_confirm_keeps_the_providers_own_error() -> None:
    with pytest.raises(ProviderUnavailable), guarded(_StoreDownOnSettle(), []):
        raise ProviderUnavailable("503", endpoint="download", status=503)


def test_reserve_waiting_waits_for_calls_in_flight_but_not_for_errors() -> None:
    attempts: list[bool] = []

    class Budget(_StoreDownOnSettle):
        def __init__(self, in_flight: bool, full_times: int) -> None:
            super().__init__()
            self.in_flight = in_flight
            self.full_times = full_times

        def reserve(self, limits: Any) -> Any:
            attempts.append(True)
            if len(attempts) <= self.full_times:
                raise BudgetExhausted("media:1", utcnow(), in_flight=self.in_flight)
            return "reservation"

    slept: list[float] = []
    assert (
        reserve_waiting(Budget(True, 3), [], max_wait_seconds=10, sleep=slept.append)
        == "reservation"
    )
    assert len(slept) == 3 and all(0 < s <= 1 for s in slept)
    attempts.clear()
    with pytest.raises(BudgetExhausted):
        reserve_waiting(Budget(False, 1), [], max_wait_seconds=10, sleep=slept.append)
    assert len(attempts) == 1


class TestRedisErrorBudget(BudgetContract):
    @pytest.fixture
    def make(self, redis_client: Any, redis_prefix: str, clock: FakeClock) -> Iterator[Factory]:
        if type(redis_client).__module__.startswith("fakeredis"):
            pytest.importorskip("lupa", reason="fakeredis runs Lua only with lupa installed")
        yield lambda: RedisErrorBudget(
            redis_client,
            prefix=redis_prefix,
            window_seconds=WINDOW,
            in_flight_ttl_seconds=IN_FLIGHT_TTL,
            clock=clock,
        )
        keys = list(redis_client.scan_iter(f"{redis_prefix}:*"))
        if keys:
            redis_client.delete(*keys)

    def test_keys_carry_the_prefix_and_expire(
        self, make: Factory, redis_client: Any, redis_prefix: str
    ) -> None:
        make().reserve([BudgetLimit("media:5", 3)])
        key = f"{redis_prefix}:budget:media:5"
        assert redis_client.zcard(key) == 1
        assert 0 < redis_client.pttl(key) <= WINDOW * 1000


class TestSqlErrorBudget(BudgetContract):
    @pytest.fixture
    def make(self, sessions: sessionmaker[Session], clock: FakeClock) -> Factory:
        return lambda: SqlErrorBudget(
            sessions, window_seconds=WINDOW, in_flight_ttl_seconds=IN_FLIGHT_TTL, clock=clock
        )

    def test_old_events_are_deleted_when_the_window_passes(
        self, make: Factory, sessions: sessionmaker[Session], clock: FakeClock
    ) -> None:
        budget = make()
        budget.confirm(budget.reserve([BudgetLimit("media:6", 5)]))
        assert count_events(sessions, "media:6") == 1
        clock.advance(WINDOW + 1)
        budget.release(budget.reserve([BudgetLimit("media:6", 5)]))
        assert count_events(sessions, "media:6") == 0


def test_limits_360dialog_lookups_also_take_the_stricter_lookup_budget(
    make_settings: Any,
) -> None:
    settings = make_settings()
    assert limits_for(settings, Provider.CLOUD, "77", "lookup") == (
        BudgetLimit("media:77", settings.error_budget_media),
    )
    assert limits_for(settings, Provider.D360, "77", "download") == (
        BudgetLimit("media:77", settings.error_budget_media),
    )
    assert limits_for(settings, Provider.D360, "77", "lookup") == (
        BudgetLimit("media:77", 19),
        BudgetLimit("lookup:77", 4),
    )


def test_budget_for_prefers_redis_and_falls_back_to_sql(
    settings: Any, sessions: sessionmaker[Session]
) -> None:
    import fakeredis

    assert isinstance(budget_for(settings, sessions, fakeredis.FakeRedis()), RedisErrorBudget)
    assert isinstance(budget_for(settings, sessions, None), SqlErrorBudget)
