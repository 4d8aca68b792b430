"""S3 stops answering (paused: SIGSTOP of the moto server) or refuses (a dead endpoint)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from ingest.models import MediaState
from tests.faults.harness import FaultStack, assert_all_stored

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

# A reconciler pass's log line, whichever format the worker logs in:
# "[2026-12-01 19:42:49,913: INFO/MainProcess] reconcile expired=0 worker_lost=0 ..."
RECONCILE_LINE = re.compile(r"^.*[\]:] reconcile .*$", re.MULTILINE)


def test_s3_paused_30_seconds_mid_burst_loses_and_duplicates_nothing(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack()
    number = stack.add_number()
    burst = stack.post_in_background(number, stack.add_media(number, 150), rate=15)
    stack.wait_rows(number, at_least=20, states=[MediaState.STORED])

    stack.moto.pause()
    stored_at_pause = stack.count_rows(number, MediaState.STORED)
    time.sleep(30)
    stack.moto.resume()
    cleared = time.monotonic()

    assert_all_stored(
        stack,
        burst.result(),
        fault="S3 paused (SIGSTOP of moto) 30 s mid-burst",
        cleared_at=cleared,
        bound=30,
        extra={"stored_at_pause": stored_at_pause},
    )


def test_s3_paused_the_workers_reconciler_still_runs_and_nothing_is_lost(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack()
    number = stack.add_number()
    stack.set_faults(latency_ms=100)
    burst = stack.post_in_background(number, stack.add_media(number, 150))
    stack.wait_rows(number, at_least=20, states=[MediaState.STORED])

    # Every worker thread ends up waiting on S3: only a reconciler with a thread of its own
    # can still run a pass (in whichever worker has the turn).
    stack.moto.pause()
    marks = {w.pid: len(w.log()) for w in stack.workers}
    time.sleep(20)
    passes = {w.pid: len(RECONCILE_LINE.findall(w.log()[marks[w.pid] :])) for w in stack.workers}
    stack.moto.resume()
    cleared = time.monotonic()

    assert_all_stored(
        stack,
        burst.result(),
        fault="S3 paused (SIGSTOP of moto) 20 s while downloads run",
        cleared_at=cleared,
        bound=30,
        checks=[
            (
                f"the workers logged reconciler passes while S3 was stopped ({passes})",
                sum(passes.values()) > 0,
            )
        ],
        extra={"reconcile_passes_during_pause": sorted(passes.values())},
    )


def test_s3_down_20_seconds_the_storage_breaker_bounds_repeated_downloads(
    start_stack: Callable[..., FaultStack],
) -> None:
    workers, threads, failures = 2, 8, 3
    stack = start_stack(
        env={
            "INGEST_STORAGE_BREAKER_FAILURES": str(failures),
            "INGEST_STORAGE_BREAKER_RESET_SECONDS": "2",
        },
        workers=workers,
        worker_concurrency=threads,
        s3_gate=True,
    )
    assert stack.gate is not None
    number = stack.add_number()
    media = stack.add_media(number, 150)
    stack.set_faults(latency_ms=100)
    burst = stack.post_in_background(number, media, rate=15)
    stack.wait_rows(number, at_least=20, states=[MediaState.STORED])

    stack.gate.close_gate()  # every S3 connection reset, old and new: S3 is down
    time.sleep(20)
    stack.gate.open_gate()
    cleared = time.monotonic()
    deliveries = burst.result()

    assert_all_stored(
        stack,
        deliveries,
        fault="S3 down (connections reset) 20 s during a 150-item burst",
        cleared_at=cleared,
        bound=30,
        max_downloads=2,
        # One transfer per item, plus what a worker process wastes before its breaker opens:
        # the transfers in flight when S3 went (one per thread) and those its threads start
        # while the first failures are still being counted. Only wasted transfers need a new
        # URL (a lookup) to retry. Without the breaker: several downloads per item.
        max_total_downloads=len(media) + workers * (threads + failures - 1),
        max_total_lookups=workers * (threads + failures - 1),
    )
