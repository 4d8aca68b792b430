"""A worker dies (SIGKILL), is told to stop (SIGTERM) or hangs (SIGSTOP) mid-transfer."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from ingest.models import MediaState
from tests.faults.harness import (
    FaultStack,
    assert_all_stored,
    count_in_logs,
    poll,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

LEASE_SECONDS = 15
SHORT_LEASE = {
    "INGEST_LEASE_SECONDS": str(LEASE_SECONDS),
    "INGEST_TASK_TIME_LIMIT": "12",
    "INGEST_TASK_SOFT_TIME_LIMIT": "10",
}


def test_a_killed_workers_budget_reservations_do_not_delay_the_next_burst(
    start_stack: Callable[..., FaultStack],
) -> None:
    # A reservation counts for at most min(HTTP timeout, lease) = 5 s without news from its
    # call. A budget of 10 makes the 8 reservations the dead worker leaves behind matter: the
    # healthy worker's 8 threads cannot all call the provider until they expire.
    stack = start_stack(
        env={
            **SHORT_LEASE,
            "INGEST_HTTP_TIMEOUT_SECONDS": "5",
            "INGEST_ERROR_BUDGET_MEDIA": "10",
        },
        workers=1,
    )
    number = stack.add_number()
    slow = stack.add_media(number, 8, kind="image", size=512_000)
    for item in slow:  # a slow CDN: 16 s a transfer, a chunk every 2 s
        stack.set_faults(item.media_id, bandwidth=32_000)
    doomed = stack.workers[0]
    in_flight = stack.post(number, slow)
    stack.wait_rows(number, at_least=8, states=[MediaState.DOWNLOADING], timeout=20)
    stack.start_worker()  # the healthy one, up before the crash: nothing waits for it
    next_media = stack.add_media(number, 100)
    downloading = stack.count_rows(number, MediaState.DOWNLOADING)

    stack.kill(doomed)  # its whole process group: a crashed machine
    killed = time.monotonic()
    burst = stack.post_in_background(number, next_media)
    for item in slow:  # their retries (after the lease) download at full speed
        stack.set_faults(item.media_id)
    next_100 = burst.result()
    poll(lambda: stack.all_stored(next_100), 60)
    burst_seconds = time.monotonic() - burst.started

    assert_all_stored(
        stack,
        [*in_flight, *next_100],
        fault="worker SIGKILLed with 8 slow transfers in flight; 100 more for the same number",
        cleared_at=killed,
        bound=LEASE_SECONDS + 2 * 2 + 15,  # the killed rows wait out their lease
        max_downloads_of={m.media_id: 2 for m in slow},
        checks=[
            ("8 transfers were in flight when the worker died", downloading == 8),
            (
                f"the next 100 items took {burst_seconds:.1f} s (bound 30 s: the 5 s "
                "reservation bound and the work, well under a minute)",
                burst_seconds <= 30,
            ),
        ],
        extra={"next_100_seconds": round(burst_seconds, 1)},
    )


def test_a_worker_killed_between_its_uploads_and_their_records_downloads_nothing_again(
    start_stack: Callable[..., FaultStack],
) -> None:
    # The window between an object and its row is made wide: PostgreSQL stops, the transfers
    # in flight finish and upload, and their records wait for the database (the finishing
    # write retries through an outage). Then the worker dies with its copies unrecorded.
    stack = start_stack(env=SHORT_LEASE, workers=1)
    number = stack.add_number()
    stack.set_faults(latency_ms=1000)  # a slow CDN: the worker's 8 threads are all busy
    deliveries = stack.post(number, stack.add_media(number, 40))
    stack.wait_rows(number, at_least=8, states=[MediaState.DOWNLOADING], timeout=20)
    stack.postgres.stop("immediate")
    # The transfers in flight (1 s each) finish and upload, and so do the rows the worker
    # had claimed and not started (a message's rows wait for a slot, not for the database).
    # Killed once nothing has been uploaded for a while: no transfer is cut, so every row
    # it held either has its copy in storage or was never started.
    assert _wait_until_steady(stack.object_keys, quiet=2.5, timeout=30), "uploads never stopped"
    [doomed] = stack.workers
    stack.kill(doomed)
    killed = time.monotonic()
    uploaded = len(stack.object_keys())
    stack.postgres.start()
    # Nothing records a copy now (the only worker is dead): the objects no row points at
    # are the ones whose records the crash lost.
    orphaned = uploaded - stack.count_rows(number, MediaState.STORED)
    stack.set_faults()  # full speed
    healthy = stack.start_worker()

    poll(lambda: stack.all_stored(deliveries), LEASE_SECONDS + 60)
    recorded_from_storage = count_in_logs(
        [healthy], "the copy an earlier attempt stored is in place"
    )
    assert_all_stored(
        stack,
        deliveries,
        fault="worker SIGKILLed after uploading, before recording (PostgreSQL stopped between)",
        cleared_at=killed,
        bound=LEASE_SECONDS + 2 * 2 + 15,  # the killed rows wait out their lease
        max_downloads=1,  # an uploaded copy is recorded from storage, never fetched again
        checks=[
            (f"{orphaned} copies were uploaded but unrecorded when the worker died", orphaned > 0),
            (
                f"the new worker recorded {recorded_from_storage} of the {orphaned} from storage",
                recorded_from_storage == orphaned,
            ),
        ],
        extra={"orphaned_copies": orphaned},
    )


def _wait_until_steady(read: Callable[[], set[str]], *, quiet: float, timeout: float) -> bool:
    """Whether ``read()`` stopped changing for ``quiet`` seconds within ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
        current = read()
        if current != last:
            last, since = current, time.monotonic()
    return True


def test_sigterm_mid_transfer_exits_within_the_shutdown_bound_and_hands_the_row_back(
    start_stack: Callable[..., FaultStack],
) -> None:
    shutdown_seconds = 5
    stack = start_stack(env={"INGEST_WORKER_SHUTDOWN_SECONDS": str(shutdown_seconds)})
    number = stack.add_number()
    [media] = stack.add_media(number, 1, kind="document", size=1_500_000)
    stack.set_faults(media.media_id, bandwidth=25_000)  # the transfer takes a minute
    [delivery] = stack.post(number, [media])
    wait_until(
        lambda: stack.rows([delivery.wamid])[delivery.wamid].state == MediaState.DOWNLOADING,
        20,
        "the transfer started",
    )
    time.sleep(2.0)  # bytes are flowing
    before = stack.rows([delivery.wamid])[delivery.wamid]
    worker = stack.worker_owning(before.lease_owner)
    assert worker is not None, f"no worker of the stack holds the lease {before.lease_owner}"

    stack.set_faults(media.media_id)  # the next attempt downloads at full speed
    stack.signal(worker, signal.SIGTERM)
    terminated = time.monotonic()
    poll(lambda: not worker.alive(), shutdown_seconds + 15)
    exit_seconds = time.monotonic() - terminated
    after = stack.rows([delivery.wamid])[delivery.wamid]
    # Handed back: pending without a lease, or already taken (or stored) by the other worker.
    handed_back = (after.state == MediaState.PENDING and after.lease_until is None) or (
        after.state in (MediaState.DOWNLOADING, MediaState.STORED)
        and after.lease_owner != before.lease_owner
    )

    assert_all_stored(
        stack,
        [delivery],
        fault="SIGTERM to a worker with a one-minute transfer in flight",
        cleared_at=terminated,
        bound=shutdown_seconds + 3 + 15,
        max_downloads=2,
        checks=[
            (
                f"the worker exited {exit_seconds:.1f} s after SIGTERM "
                f"(bound {shutdown_seconds} + 3 s)",
                not worker.alive() and exit_seconds <= shutdown_seconds + 3,
            ),
            (
                f"the row was claimable at once (state {after.state}, lease owner "
                f"{after.lease_owner}, until {after.lease_until})",
                handed_back,
            ),
        ],
        extra={"exit_seconds": round(exit_seconds, 1)},
    )


def test_worker_heartbeat_is_fresh_while_running_and_stale_while_stopped(
    start_stack: Callable[..., FaultStack],
) -> None:
    max_age = 5
    stack = start_stack(workers=0)
    heartbeat = {"INGEST_WORKER_HEARTBEAT_FILE": str(stack.root / "worker.heartbeat")}
    worker = stack.start_worker(env=heartbeat)

    def worker_alive() -> int:
        """``ingest worker-alive``'s exit status: 0 fresh, 1 stale."""
        probe = stack.group.run(
            "worker-alive", "--max-age", str(max_age), env=heartbeat, check=False
        )
        return probe.returncode

    fresh = poll(lambda: worker_alive() == 0, 10)
    stack.signal(worker, signal.SIGSTOP)  # hung: the process is there, nothing in it runs
    stopped = time.monotonic()
    try:
        stale = poll(lambda: worker_alive() == 1, max_age + 5)
        stale_after = time.monotonic() - stopped
    finally:
        stack.signal(worker, signal.SIGCONT)
    resumed = time.monotonic()
    fresh_again = poll(lambda: worker_alive() == 0, 10)

    # The worker, resumed, still works.
    number = stack.add_number()
    assert_all_stored(
        stack,
        stack.post(number, stack.add_media(number, 20)),
        fault=f"worker SIGSTOPped past the heartbeat's max age ({max_age} s), then SIGCONT",
        cleared_at=resumed,
        bound=20,
        checks=[
            ("worker-alive exits 0 while the worker runs", fresh),
            (
                f"worker-alive exits 1 within max age + 5 s of SIGSTOP ({stale_after:.1f} s)",
                stale,
            ),
            ("worker-alive exits 0 again after SIGCONT", fresh_again),
        ],
        extra={"stale_after_seconds": round(stale_after, 1)},
    )
