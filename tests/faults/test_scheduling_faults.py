"""Retries without beat, two beats at once, and provider errors in a large burst.

Backoff lives in ``next_attempt_at``: a row that failed an attempt is woken again only by a
reconciler pass. Workers run the reconciler themselves (under a database lease), so beat is
optional; and a second beat must not make anything download twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.faults.harness import Delivery, FaultStack, assert_all_stored, poll

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

INTERVAL = 2
RETRY_MAX = 4
RETRIES = {
    "INGEST_RECONCILE_INTERVAL_SECONDS": str(INTERVAL),
    "INGEST_RETRY_BASE_SECONDS": "1",
    "INGEST_RETRY_MAX_SECONDS": str(RETRY_MAX),
}


def test_without_beat_provider_errors_are_still_retried_to_stored(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack(env=RETRIES, beats=0)
    number = stack.add_number()
    stack.set_faults(download_statuses=[500] * 8)  # the first 8 transfers fail
    deliveries = stack.post(number, stack.add_media(number, 150))
    acknowledged = time.monotonic()
    # The webhooks are all answered before the workers have necessarily met every 500.
    deadline = acknowledged + RETRY_MAX + 2 * INTERVAL + 15
    while (errors := len(stack.stats()["errors_served"])) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)

    assert_all_stored(
        stack,
        deliveries,
        fault="beat not running; 8 provider 500s in a 150-item burst",
        cleared_at=acknowledged,
        bound=RETRY_MAX + 2 * INTERVAL + 15,  # the backoff, two passes, the work
        checks=[("the provider's 500s were served", errors == 8)],
        extra={"provider_errors": errors},
    )


def test_two_beats_at_once_download_nothing_twice(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack(env=RETRIES, beats=2)
    number = stack.add_number()
    stack.set_faults(download_statuses=[500] * 8)  # retries: the reconciler passes matter
    deliveries = stack.post(number, stack.add_media(number, 150))
    acknowledged = time.monotonic()

    assert_all_stored(
        stack,
        deliveries,
        fault="two beats at once; 8 provider 500s in a 150-item burst",
        cleared_at=acknowledged,
        bound=RETRY_MAX + 2 * INTERVAL + 15,
        max_downloads=1,
    )


def test_provider_errors_in_a_burst_cost_at_most_half_the_fault_free_time(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack(env=RETRIES)
    # 200 ms a request: the 16 worker threads have 16 transfers in flight at once.
    stack.set_faults(latency_ms=200)

    def timed_burst(count: int) -> tuple[float, float, list[Delivery]]:
        """(when the first webhook went, how long until every row was stored, deliveries)."""
        number = stack.add_number()
        media = stack.add_media(number, count)
        burst = stack.post_in_background(number, media)
        deliveries = burst.result()
        poll(lambda: stack.all_stored(deliveries), 120)
        return burst.started, time.monotonic() - burst.started, deliveries

    _, fault_free_seconds, reference = timed_burst(250)
    stack.set_faults(latency_ms=200, download_statuses=[500] * 4)
    # Timed from the burst's first webhook, as the fault-free burst is: putting the media at
    # the sandbox first is setup, and on a busy machine it alone took a second or two.
    started, faulty_seconds, deliveries = timed_burst(250)

    assert_all_stored(
        stack,
        [*reference, *deliveries],
        fault="250-item burst, 16 in flight, 4 provider 500s (vs the same burst without)",
        cleared_at=started,
        bound=1.5 * fault_free_seconds,
        checks=[
            (
                f"with errors {faulty_seconds:.1f} s, without {fault_free_seconds:.1f} s "
                "(at most 1.5x)",
                faulty_seconds <= 1.5 * fault_free_seconds,
            )
        ],
        extra={
            "fault_free_seconds": round(fault_free_seconds, 1),
            "with_errors_seconds": round(faulty_seconds, 1),
        },
    )
