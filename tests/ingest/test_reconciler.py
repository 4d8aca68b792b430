from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from ingest.models import Instance, MediaItem, MediaState, utcnow
from ingest.queues import (
    LARGE_MEDIA,
    SMALL_MEDIA,
    DownloadJob,
    RecordingScheduler,
    SchedulerUnavailable,
)
from ingest.reconciler import (
    RECONCILE_TURN,
    ReconcilerLoop,
    reconcile,
    reconcile_if_its_turn,
    take_turn,
)
from ingest.settings import Settings
from tests.factories import make_instance, make_media_item


class Rows:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        with sessions.begin() as session:
            self.instance_id = make_instance(session).id

    def add(self, **values: Any) -> int:
        # Due a little before the reconciler's `now` unless the test says otherwise.
        values.setdefault("next_attempt_at", utcnow() - timedelta(minutes=1))
        with self.sessions.begin() as session:
            instance = session.get(Instance, self.instance_id)
            assert instance is not None
            return make_media_item(session, instance, **values).id

    def get(self, item_id: int) -> MediaItem:
        with self.sessions() as session:
            item = session.get(MediaItem, item_id)
            assert item is not None
            return item


@pytest.fixture
def rows(sessions: sessionmaker[Session]) -> Rows:
    return Rows(sessions)


def test_due_rows_without_a_wake_up_are_published_to_their_queue(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    image = rows.add(enqueued_at=None, next_attempt_at=now - timedelta(seconds=5))
    document = rows.add(media_type="document", declared_mime="application/pdf", enqueued_at=None)
    big_image = rows.add(declared_size=settings.large_media_bytes, enqueued_at=None)
    later = rows.add(enqueued_at=None, next_attempt_at=now + timedelta(minutes=5))
    stored = rows.add(state=MediaState.STORED, enqueued_at=None)
    scheduler = RecordingScheduler()

    report = reconcile(sessions, scheduler, settings, now=now)

    assert set(scheduler.jobs) == {
        DownloadJob(image, SMALL_MEDIA),
        DownloadJob(document, LARGE_MEDIA),
        DownloadJob(big_image, LARGE_MEDIA),
    }
    assert report.woken == 3
    assert rows.get(image).enqueued_at is not None
    assert rows.get(later).enqueued_at is None and rows.get(stored).enqueued_at is None
    # Woken once: the next pass a minute later publishes nothing new.
    again = RecordingScheduler()
    reconcile(sessions, again, settings, now=now + timedelta(minutes=1))
    assert again.jobs == []


def test_a_retry_whose_backoff_ended_is_woken_and_a_lost_wake_up_is_resent(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    retry = rows.add(
        enqueued_at=now - timedelta(minutes=2), next_attempt_at=now - timedelta(seconds=1)
    )
    recent = rows.add(
        enqueued_at=now - timedelta(minutes=2), next_attempt_at=now - timedelta(minutes=3)
    )
    lost = rows.add(
        enqueued_at=now - timedelta(seconds=settings.lease_seconds + 1),
        next_attempt_at=now - timedelta(seconds=settings.lease_seconds + 1),
    )
    scheduler = RecordingScheduler()
    backlog = DownloadJob(-1, SMALL_MEDIA)  # the queue still holds wake-ups
    scheduler.schedule([backlog])
    reconcile(sessions, scheduler, settings, now=now)
    assert {job.media_item_id for job in scheduler.jobs[1:]} == {retry, lost}
    assert recent not in {job.media_item_id for job in scheduler.jobs}


def test_rows_past_seven_days_expire_and_lose_their_url(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    old = rows.add(expires_at=now - timedelta(seconds=1), download_url="https://x/?sig=s")
    leased = rows.add(
        expires_at=now - timedelta(seconds=1),
        state=MediaState.DOWNLOADING,
        lease_until=now + timedelta(minutes=5),
        lease_owner="busy",
    )
    report = reconcile(sessions, RecordingScheduler(), settings, now=now)
    assert report.expired == 1
    assert rows.get(old).state == MediaState.EXPIRED and rows.get(old).download_url is None
    assert rows.get(leased).state == MediaState.DOWNLOADING  # its worker decides


def test_lapsed_leases_go_back_to_pending_until_the_lease_loss_cap(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    lapsed = dict(
        state=MediaState.DOWNLOADING,
        lease_until=now - timedelta(seconds=1),
        lease_owner="dead",
        enqueued_at=now - timedelta(minutes=20),
        next_attempt_at=now - timedelta(minutes=20),
    )
    # Many attempts (throttled for days, say) but no lost lease before this one: retried.
    throttled = rows.add(attempts=50, lease_losses=0, **lapsed)
    killer = rows.add(attempts=3, lease_losses=settings.max_lease_losses - 1, **lapsed)
    scheduler = RecordingScheduler()
    report = reconcile(sessions, scheduler, settings, now=now)
    assert (report.worker_lost, report.released) == (1, 1)
    row = rows.get(throttled)
    assert row.state == MediaState.PENDING and row.lease_owner is None
    assert row.lease_losses == 1
    assert [job.media_item_id for job in scheduler.jobs] == [throttled]
    dead = rows.get(killer)
    assert (dead.state, dead.failure_reason) == (MediaState.FAILED, "worker_lost")
    assert dead.lease_losses == settings.max_lease_losses


def test_signed_urls_are_purged_once_stale_or_used(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    url = "https://cdn.test/x?sig=secret"
    fresh = rows.add(download_url=url, url_deadline=now + timedelta(minutes=3))
    stale = rows.add(download_url=url, url_deadline=now - timedelta(seconds=1))
    done = rows.add(
        download_url=url, url_deadline=now + timedelta(minutes=3), state=MediaState.STORED
    )
    report = reconcile(sessions, RecordingScheduler(), settings, now=now)
    assert report.purged_urls == 2
    assert rows.get(fresh).download_url == url
    assert rows.get(stale).download_url is None and rows.get(done).download_url is None


def test_a_broker_outage_leaves_the_rows_for_the_next_pass(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    class DownScheduler(RecordingScheduler):
        def schedule(self, jobs: Any) -> None:
            raise SchedulerUnavailable("ConnectionRefusedError")

    item = rows.add(enqueued_at=None)
    report = reconcile(sessions, DownScheduler(), settings, now=utcnow())
    assert report.publish_failed and report.woken == 0
    assert rows.get(item).enqueued_at is None
    scheduler = RecordingScheduler()
    reconcile(sessions, scheduler, settings, now=utcnow())
    assert [job.media_item_id for job in scheduler.jobs] == [item]


def test_a_publish_that_blows_up_does_not_leave_its_rows_waiting_a_lease(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    class BrokenScheduler(RecordingScheduler):
        def schedule(self, jobs: Any) -> None:
            raise RuntimeError("a bug in the publisher")

    item = rows.add(enqueued_at=None)
    with pytest.raises(RuntimeError):
        reconcile(sessions, BrokenScheduler(), settings, now=utcnow())
    assert rows.get(item).enqueued_at is None
    scheduler = RecordingScheduler()
    reconcile(sessions, scheduler, settings, now=utcnow())
    assert [job.media_item_id for job in scheduler.jobs] == [item]


def test_a_database_failure_while_undoing_the_wake_up_stamp_does_not_crash_the_pass(
    rows: Rows,
    sessions: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.exc import OperationalError

    class DownScheduler(RecordingScheduler):
        def schedule(self, jobs: Any) -> None:
            raise SchedulerUnavailable("ConnectionError")

    def database_down(session: Any, jobs: Any) -> None:
        raise OperationalError("UPDATE media_items", {}, Exception("server closed the connection"))

    rows.add(enqueued_at=None)
    # The undo is the one the relay shares (ingest.wake_relay.forget_unsent).
    monkeypatch.setattr("ingest.media_rows.forget_enqueued", database_down)
    report = reconcile(sessions, DownScheduler(), settings, now=utcnow())
    assert report.publish_failed and report.woken == 0


# --- lost wake-ups, and who runs the pass ------------------------------------------------


def test_a_wake_up_lost_with_the_brokers_data_is_resent_after_one_interval(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    """Redis flushed: the queue is empty, yet rows wait with a recent wake-up. They are
    woken after one interval, not after a whole lease."""
    now = utcnow()
    interval = timedelta(seconds=settings.reconcile_interval_seconds)
    lost = rows.add(
        enqueued_at=now - interval - timedelta(seconds=1), next_attempt_at=now - interval * 2
    )
    recent = rows.add(enqueued_at=now - interval / 2, next_attempt_at=now - interval * 2)
    scheduler = RecordingScheduler()  # empty queues

    reconcile(sessions, scheduler, settings, now=now)

    assert [job.media_item_id for job in scheduler.jobs] == [lost]
    assert rows.get(recent).enqueued_at == now - interval / 2


def test_a_backlog_waiting_in_its_queue_gets_no_duplicate_wake_ups(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    woken_at = now - timedelta(seconds=settings.reconcile_interval_seconds * 5)
    waiting = rows.add(enqueued_at=woken_at, next_attempt_at=woken_at)
    scheduler = RecordingScheduler()
    scheduler.schedule([DownloadJob(waiting, SMALL_MEDIA)])  # still in the queue

    reconcile(sessions, scheduler, settings, now=now)

    assert scheduler.jobs == [DownloadJob(waiting, SMALL_MEDIA)]


def test_a_broker_that_cannot_count_its_queues_falls_back_to_the_lease_rule(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    class Uncountable(RecordingScheduler):
        def queue_depths(self, queues: Any) -> dict[str, int]:
            raise SchedulerUnavailable("ConnectionError")

    now = utcnow()
    woken_at = now - timedelta(seconds=settings.reconcile_interval_seconds * 2)
    recent = rows.add(enqueued_at=woken_at, next_attempt_at=woken_at)
    lost_at = now - timedelta(seconds=settings.lease_seconds + 1)
    lost = rows.add(enqueued_at=lost_at, next_attempt_at=lost_at)
    scheduler = Uncountable()
    reconcile(sessions, scheduler, settings, now=now)
    assert [job.media_item_id for job in scheduler.jobs] == [lost]
    assert rows.get(recent).enqueued_at is not None


def test_one_pass_per_interval_however_many_processes_offer(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    rows.add(enqueued_at=None)
    interval = timedelta(seconds=settings.reconcile_interval_seconds)
    offers = [
        reconcile_if_its_turn(sessions, RecordingScheduler(), settings, owner=f"w{n}", now=now)
        for n in range(3)
    ]
    assert [report is not None for report in offers] == [True, False, False]
    later = now + interval
    assert take_turn(sessions, RECONCILE_TURN, owner="w2", now=later, period=interval)
    assert not take_turn(sessions, RECONCILE_TURN, owner="w0", now=later, period=interval)


def test_the_loop_runs_its_pass_again_after_a_failure() -> None:
    passes: list[int] = []
    done = threading.Event()

    def flaky_pass() -> None:
        passes.append(1)
        if len(passes) == 1:
            raise RuntimeError("database went away")
        if len(passes) >= 3:
            done.set()

    loop = ReconcilerLoop(flaky_pass, interval_seconds=0.02)
    loop.start()
    try:
        assert done.wait(5)
    finally:
        loop.stop()
    assert len(passes) >= 3


def _sample(name: str, **labels: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


def test_each_pass_measures_the_backlog_by_state_risk_and_age(
    rows: Rows, sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    rows.add(received_at=now - timedelta(minutes=30), expires_at=now + timedelta(minutes=30))
    rows.add(received_at=now - timedelta(minutes=5), expires_at=now + timedelta(hours=20))
    rows.add(state=MediaState.FAILED, failure_reason="too_large")
    rows.add(state=MediaState.STORED)
    scheduler = RecordingScheduler()
    scheduler.schedule([DownloadJob(-1, SMALL_MEDIA)])

    reconcile(sessions, scheduler, settings, now=now)

    assert _sample("ingest_media_items", state="pending", reason="") == 2
    assert _sample("ingest_media_items", state="failed", reason="too_large") == 1
    assert _sample("ingest_media_items", state="stored", reason="") == 1
    assert _sample("ingest_media_items", state="failed", reason="checksum_mismatch") == 0
    assert _sample("ingest_media_at_risk", within="24h") == 2
    assert _sample("ingest_media_at_risk", within="1h") == 1
    assert _sample("ingest_oldest_pending_seconds") == pytest.approx(1800, abs=1)
    assert _sample("ingest_queue_depth", queue=SMALL_MEDIA) == 3  # one waiting, two just woken
