import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from ingest.models import MediaState, utcnow
from ingest.retry_policy import RULES, Action, Decision, Outcome, backoff_seconds, decide

NEVER_RETRIED = {
    Outcome.PROVIDER_REJECTED: "provider_rejected",
    Outcome.MEDIA_NOT_FOUND: "media_not_found",
    Outcome.TOO_LARGE: "too_large",
    Outcome.CHECKSUM_MISMATCH: "checksum_mismatch",
    Outcome.UNSUPPORTED_TYPE: "unsupported_type",
    Outcome.WORKER_LOST: "worker_lost",
    Outcome.PROVIDER_ERROR: "provider_error",
}
RETRIED = [
    Outcome.THROTTLED,
    Outcome.PROVIDER_UNAVAILABLE,
    Outcome.URL_REJECTED,
    Outcome.STORAGE_UNAVAILABLE,
    Outcome.INSTANCE_UNAUTHORIZED,
]


def test_every_outcome_has_exactly_one_rule() -> None:
    assert set(RULES) == set(Outcome)


@pytest.mark.parametrize(("outcome", "reason"), NEVER_RETRIED.items())
def test_permanent_outcomes_fail_with_their_reason_code(
    outcome: Outcome, reason: str, make_settings: Any
) -> None:
    now = utcnow()
    decision = decide(
        outcome,
        attempts=1,
        now=now,
        expires_at=now + timedelta(days=7),
        settings=make_settings(),
        rng=random.Random(1),
    )
    assert decision.state is MediaState.FAILED
    assert decision.failure_reason == reason
    assert decision.next_attempt_at is None


@pytest.mark.parametrize("outcome", RETRIED)
def test_transient_outcomes_go_back_to_pending_later(outcome: Outcome, make_settings: Any) -> None:
    now = utcnow()
    decision = decide(
        outcome,
        attempts=3,
        now=now,
        expires_at=now + timedelta(days=7),
        settings=make_settings(),
        rng=random.Random(1),
    )
    assert decision.state is MediaState.PENDING
    assert decision.next_attempt_at is not None and decision.next_attempt_at > now
    assert decision.disconnect is (outcome is Outcome.INSTANCE_UNAUTHORIZED)


def test_backoff_doubles_with_jitter_and_is_capped(make_settings: Any) -> None:
    settings = make_settings(retry_base_seconds=10, retry_max_seconds=100)
    rng = random.Random(7)
    for attempts, ceiling in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (50, 100)]:
        delays = [backoff_seconds(attempts, settings, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d, 6) for d in delays}) > 100  # jittered, not one fixed value


def test_retry_after_from_the_provider_is_a_floor(make_settings: Any) -> None:
    now = utcnow()
    decision = decide(
        Outcome.THROTTLED,
        attempts=1,
        now=now,
        expires_at=now + timedelta(days=7),
        settings=make_settings(retry_base_seconds=1),
        rng=random.Random(1),
        retry_after=120,
    )
    assert decision.next_attempt_at is not None
    assert decision.next_attempt_at >= now + timedelta(seconds=120)


def test_a_retry_past_the_seven_days_gives_up_as_expired(make_settings: Any) -> None:
    now = utcnow()
    decision = decide(
        Outcome.PROVIDER_UNAVAILABLE,
        attempts=20,
        now=now,
        expires_at=now + timedelta(seconds=5),
        settings=make_settings(),
        rng=random.Random(1),
    )
    assert decision.state is MediaState.EXPIRED
    assert decision.next_attempt_at is None


def test_budget_block_waits_for_the_window_and_gives_the_attempt_back(make_settings: Any) -> None:
    now = utcnow()
    frees = now + timedelta(minutes=20)
    decision = decide(
        Outcome.BUDGET_EXHAUSTED,
        attempts=2,
        now=now,
        expires_at=now + timedelta(days=7),
        settings=make_settings(),
        rng=random.Random(1),
        not_before=frees,
    )
    assert decision.state is MediaState.PENDING
    assert decision.next_attempt_at is not None and decision.next_attempt_at >= frees
    assert decision.refund_attempt
    assert RULES[Outcome.BUDGET_EXHAUSTED].action is Action.RETRY


def _throttled(settings: Any, retry_after: float) -> tuple[datetime, Decision]:
    """A first throttled attempt of a fresh item, with the provider's Retry-After."""
    now = utcnow()
    decision = decide(
        Outcome.THROTTLED,
        attempts=1,
        now=now,
        expires_at=now + timedelta(days=7),
        settings=settings,
        rng=random.Random(1),
        retry_after=retry_after,
    )
    return now, decision


@pytest.mark.parametrize("retry_after", [1e12, 1e300, 101.0])
def test_a_huge_retry_after_is_capped_at_the_longest_backoff(
    make_settings: Any, retry_after: float
) -> None:
    settings = make_settings(retry_base_seconds=1, retry_max_seconds=100)
    now, decision = _throttled(settings, retry_after)
    assert decision.state is MediaState.PENDING
    assert decision.next_attempt_at == now + timedelta(seconds=100)


@pytest.mark.parametrize("retry_after", [float("inf"), float("nan"), float("-inf"), -30.0])
def test_a_meaningless_retry_after_is_ignored(make_settings: Any, retry_after: float) -> None:
    settings = make_settings(retry_base_seconds=10, retry_max_seconds=100)
    now, decision = _throttled(settings, retry_after)
    assert decision.state is MediaState.PENDING
    assert decision.next_attempt_at is not None
    assert now + timedelta(seconds=5) <= decision.next_attempt_at <= now + timedelta(seconds=10)


def test_a_delay_past_any_datetime_expires_instead_of_overflowing(make_settings: Any) -> None:
    _, decision = _throttled(make_settings(retry_max_seconds=1e300), 1e300)
    assert decision.state is MediaState.EXPIRED
    assert decision.next_attempt_at is None
