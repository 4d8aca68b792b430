"""PostgreSQL, the source of truth, crashes mid-burst and comes back."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from ingest.models import MediaState
from tests.faults.harness import FaultStack, assert_all_stored

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

OUTAGE_SECONDS = 15.0


def test_postgres_crash_mid_burst_answers_503_until_back_and_loses_nothing(
    start_stack: Callable[..., FaultStack],
) -> None:
    # The default 900 s lease: an attempt the crash cuts off between its claim and its
    # record must not wait it out. Its finishing write is retried until the database is
    # back, so those rows are stored within the recovery bound, far under one lease.
    stack = start_stack()
    number = stack.add_number()
    # A slow CDN (1 s a transfer): about ten attempts are in flight when the database dies.
    stack.set_faults(latency_ms=1000)
    # 10 a second over 20 s, so webhooks keep arriving through the whole outage.
    burst = stack.post_in_background(number, stack.add_media(number, 200), rate=10)
    stack.wait_rows(number, at_least=30, states=[MediaState.STORED])

    in_flight = stack.message_ids(number, MediaState.DOWNLOADING)
    stack.postgres.stop("immediate")  # a crash: no checkpoint, every client cut off
    stopped = time.monotonic()
    time.sleep(OUTAGE_SECONDS)
    stack.postgres.start()
    cleared = time.monotonic()
    deliveries = burst.result()

    answered_503 = sum(1 for d in deliveries if 503 in d.answers)
    assert_all_stored(
        stack,
        deliveries,
        fault=f"PostgreSQL stopped -m immediate for {OUTAGE_SECONDS:.0f} s mid-burst",
        cleared_at=cleared,
        bound=2 * 2 + 15,  # two reconciler passes, the work: far under the 900 s lease
        # An attempt cut off mid-transfer downloads again; one cut off after its upload is
        # recorded from the object it left (test_worker_faults' killed-between test).
        max_downloads=2,
        checks=[
            ("attempts were in flight when the database stopped", len(in_flight) > 0),
            ("some webhooks were answered 503 during the outage", answered_503 > 0),
        ],
        extra={
            "in_flight_at_stop": len(in_flight),
            "answered_503": answered_503,
            "outage_seconds": round(cleared - stopped, 1),
        },
        stored_after={"in_flight_at_stop": in_flight},
    )
