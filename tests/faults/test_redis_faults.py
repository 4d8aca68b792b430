"""Redis, the broker and the shared counters, dies, blips or loses everything it held.

A Redis of the test's own (no persistence): killing it loses every queued and unacked
wake-up and every error-budget entry, which is what a crash of an unpersisted Redis does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import update

from ingest.models import MediaItem, MediaState
from tests.faults.harness import FaultStack, assert_all_stored, count_in_logs

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

OUTAGE_SECONDS = 10.0
# Short leases: a wake-up lost with Redis comes back within one lease whatever else happens,
# so these tests measure the workers' reconnection, not the lost-wake-up rule (see the
# FLUSHALL test for that, on the default lease).
SHORT_LEASE = {
    "INGEST_LEASE_SECONDS": "30",
    "INGEST_TASK_TIME_LIMIT": "25",
    "INGEST_TASK_SOFT_TIME_LIMIT": "20",
}
UNRECOVERABLE = "Unrecoverable error"


def test_redis_killed_twice_mid_burst_workers_reconnect_and_lose_nothing(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack(env=SHORT_LEASE)
    number = stack.add_number()
    stack.set_faults(latency_ms=500)  # half a second a request: transfers in flight at each kill
    burst = stack.post_in_background(number, stack.add_media(number, 200), rate=8)

    stack.wait_rows(number, at_least=20, states=[MediaState.STORED])
    in_flight = []
    for outage in (1, 2):
        if outage == 2:
            time.sleep(5.0)  # the workers had time to reconnect; more transfers in flight
        in_flight.append(stack.count_rows(number, MediaState.DOWNLOADING))
        stack.redis.kill()
        time.sleep(OUTAGE_SECONDS)
        stack.redis.restart()  # same port, empty: what a supervisor does
    cleared = time.monotonic()

    workers_log_unrecoverable = count_in_logs(stack.workers, UNRECOVERABLE)
    assert_all_stored(
        stack,
        burst.result(),
        fault=f"Redis (broker+counters) SIGKILLed {OUTAGE_SECONDS:.0f} s, twice, mid-burst",
        cleared_at=cleared,
        bound=30 + 2 * 2 + 15,  # one short lease, two reconciler passes, the work
        checks=[
            ("downloads were in flight at each kill", min(in_flight) > 0),
            (f"no worker logged {UNRECOVERABLE!r}", workers_log_unrecoverable == 0),
        ],
        extra={"in_flight_at_kills": in_flight},
    )


def test_budget_release_failing_in_a_redis_blip_neither_loses_nor_repeats_the_download(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack(env=SHORT_LEASE)
    number = stack.add_number()
    media = stack.add_media(number, 16, kind="image", size=256_000)
    for item in media:  # 4 s a transfer: the blip starts mid-transfer and outlasts it
        stack.set_faults(item.media_id, bandwidth=64_000)
    burst = stack.post_in_background(number, media)
    stack.wait_rows(number, at_least=12, states=[MediaState.DOWNLOADING], timeout=20)
    time.sleep(1.0)  # bytes are flowing; every reservation was taken before the blip

    stack.redis.kill()
    downloading = stack.count_rows(number, MediaState.DOWNLOADING)
    time.sleep(8.0)  # longer than the rest of every transfer: each release meets no Redis
    stack.redis.restart()
    cleared = time.monotonic()

    assert_all_stored(
        stack,
        burst.result(),
        fault="Redis SIGKILLed 8 s while 16 transfers finish (budget release fails)",
        cleared_at=cleared,
        bound=30 + 2 * 2 + 10,
        checks=[("transfers were in flight when Redis died", downloading >= 12)],
        extra={"downloading_at_kill": downloading},
    )


def test_redis_flushall_mid_burst_every_pending_row_is_rewoken_within_two_passes(
    start_stack: Callable[..., FaultStack],
) -> None:
    interval = 2
    # The default lease (900 s): a lost wake-up must not wait for it. Four rows at a time per
    # worker: with eight, its tasks once started (and claimed) the relay's rows as fast as
    # they came, and no wake-up was left in Redis to lose (pending_at_flush 0).
    stack = start_stack(
        env={"INGEST_RECONCILE_INTERVAL_SECONDS": str(interval)}, worker_concurrency=4
    )
    number = stack.add_number()
    stack.set_faults(latency_ms=300)  # slower than the webhooks arrive: a queue builds up
    burst = stack.post_in_background(number, stack.add_media(number, 200))
    stack.wait_rows(number, at_least=30, states=[MediaState.STORED])

    stack.redis.flushall()
    cleared = time.monotonic()
    pending = stack.count_rows(number, MediaState.PENDING)

    assert_all_stored(
        stack,
        burst.result(),
        fault="Redis FLUSHALL mid-burst (queued wake-ups and counters lost), lease 900 s",
        cleared_at=cleared,
        bound=2 * interval + 20,  # two reconciler passes, then the work
        checks=[("wake-ups were queued when Redis was flushed", pending >= 20)],
        extra={"pending_at_flush": pending},
    )


def test_a_redelivered_webhook_rewakes_its_pending_row_whose_wake_up_was_lost(
    start_stack: Callable[..., FaultStack],
) -> None:
    # The reconciler cannot help here: its passes come a day apart (the first at a random
    # point of that day), so only the redelivery can wake the rows within the test.
    interval = 24 * 3600
    stack = start_stack(
        env={"INGEST_RECONCILE_INTERVAL_SECONDS": str(interval)}, workers=0, beats=0
    )
    number = stack.add_number()
    media = stack.add_media(number, 20)
    # First delivery: the rows are committed, and their wake-ups stamped but never sent (a
    # relay killed between its stamp and its publish). Then time passes: the rows have been
    # due, and their wake-up lost, for longer than one reconciler interval when the provider
    # redelivers.
    lost = {"INGEST_BROKER_URL": "redis://127.0.0.1:9/0"}
    cut_off = stack.group.web(env=lost, workers=1)
    first = stack.post(number, media, web=cut_off.base_url)
    assert all(d.acknowledged for d in first)
    long_ago = datetime.now(UTC) - timedelta(seconds=interval + 60)
    with stack.engine.begin() as conn:
        conn.execute(
            update(MediaItem)
            .where(MediaItem.message_id.in_([d.wamid for d in first]))
            .values(enqueued_at=long_ago, next_attempt_at=long_ago)
        )
    stack.start_worker()
    stack.start_worker()
    pending = stack.count_rows(number, MediaState.PENDING)

    # The provider redelivers the same bodies (same message ids) to a healthy web process.
    redelivered = time.monotonic()
    again = stack.redeliver(first)
    assert_all_stored(
        stack,
        again,
        fault="provider redelivers webhooks whose rows are pending with a lost wake-up",
        cleared_at=redelivered,
        bound=15,
        checks=[("the rows were pending before the redelivery", pending == len(first))],
        extra={"pending_before_redelivery": pending},
    )


def test_readiness_with_redis_down_is_still_ready_and_webhooks_are_acknowledged(
    start_stack: Callable[..., FaultStack],
) -> None:
    stack = start_stack(env=SHORT_LEASE)
    number = stack.add_number()
    media = stack.add_media(number, 40)

    stack.redis.kill()
    ready = httpx.get(f"{stack.web.base_url}/readyz", timeout=10)
    checks = ready.json().get("checks", {})
    burst = stack.post_in_background(number, media)
    deliveries = burst.result()
    time.sleep(2.0)
    stack.redis.restart()
    cleared = time.monotonic()

    assert_all_stored(
        stack,
        deliveries,
        fault="Redis down: readiness, and webhooks acknowledged during the outage",
        cleared_at=cleared,
        bound=2 * 2 + 20,
        checks=[
            (
                f"/readyz answers 200 with Redis down (got {ready.status_code})",
                ready.status_code == 200,
            ),
            (f"readiness: database ok ({checks})", checks.get("database") == "ok"),
            (
                f"readiness: broker and redis reported as errors ({checks})",
                str(checks.get("broker", "")).startswith("error")
                and str(checks.get("redis", "")).startswith("error"),
            ),
        ],
    )
