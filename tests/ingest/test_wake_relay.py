"""The wake-up relay: every committed row without a wake-up gets one, exactly once, several
rows to a message; a broker that refuses leaves the rows for the next pass; the relay thread
polls for new rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ingest import media_rows
from ingest.db import session_scope
from ingest.events import MediaEvent
from ingest.intake import RoutedEvent, record_events
from ingest.models import MediaItem, MediaState, MediaType, utcnow
from ingest.queues import (
    LARGE_MEDIA,
    SMALL_MEDIA,
    DownloadJob,
    RecordingScheduler,
    SchedulerUnavailable,
    WakeUp,
    wake_ups,
)
from ingest.settings import Settings
from ingest.wake_relay import RelayLoop, any_unwoken, relay_pass
from tests.factories import make_instance, make_media_item


def event(message_id: str, **overrides: Any) -> MediaEvent:
    values: dict[str, Any] = {
        "phone_number_id": "1",
        "message_id": message_id,
        "media_type": MediaType.IMAGE,
        "media_id": "1234567890",
        "mime_type": "image/jpeg",
        "sha256": None,
        "url": None,
    }
    values.update(overrides)
    return MediaEvent(**values)


def receive(sessions: sessionmaker[Session], *events: MediaEvent, settings: Settings) -> None:
    """What the receiver does: record and commit, nothing more."""
    with session_scope(sessions) as session:
        instance = make_instance(session)
        record_events(
            session,
            [RoutedEvent(instance.id, e) for e in events],
            settings=settings,
            received_at=utcnow(),
        )


def stamps(sessions: sessionmaker[Session]) -> dict[str, Any]:
    with session_scope(sessions) as session:
        return dict(session.execute(select(MediaItem.message_id, MediaItem.enqueued_at)).all())


class RefusingScheduler(RecordingScheduler):
    def schedule(self, jobs: Sequence[DownloadJob]) -> None:
        raise SchedulerUnavailable("ConnectionRefusedError")


# --- one pass ------------------------------------------------------------------------------


def test_a_pass_wakes_every_new_row_once_on_the_queue_its_size_calls_for(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    big = settings.large_media_bytes + 1
    receive(
        sessions,
        event("small", file_size=1000),
        event("big", file_size=big),
        event("video", media_type=MediaType.VIDEO),  # no size: the type's default queue
        event("doc", media_type=MediaType.DOCUMENT, file_size=10),
        settings=settings,
    )
    scheduler = RecordingScheduler()
    assert any_unwoken(sessions)
    assert relay_pass(sessions, scheduler, settings) == 4
    with session_scope(sessions) as session:
        ids = dict(session.execute(select(MediaItem.message_id, MediaItem.id)).all())
    assert {job.media_item_id: job.queue for job in scheduler.take()} == {
        ids["small"]: SMALL_MEDIA,
        ids["big"]: LARGE_MEDIA,
        ids["video"]: LARGE_MEDIA,
        ids["doc"]: SMALL_MEDIA,  # a stated size beats the type's default
    }
    assert all(stamp is not None for stamp in stamps(sessions).values())
    assert not any_unwoken(sessions)
    assert relay_pass(sessions, scheduler, settings) == 0
    assert scheduler.take() == []


def test_rows_not_pending_or_not_due_are_not_relayed(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    now = utcnow()
    with session_scope(sessions) as session:
        instance = make_instance(session)
        make_media_item(session, instance, message_id="stored", state=MediaState.STORED)
        make_media_item(
            session, instance, message_id="later", next_attempt_at=now + timedelta(hours=1)
        )
        due = make_media_item(session, instance, message_id="due").id
    scheduler = RecordingScheduler()
    assert relay_pass(sessions, scheduler, settings) == 1
    assert [job.media_item_id for job in scheduler.take()] == [due]
    assert not any_unwoken(sessions)  # nothing worth a pass (and a write lock) until later


def test_asking_for_unwoken_rows_waits_on_no_writer(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    """Every worker's relay asks 20 times a second: on SQLite the question must read beside
    a writer holding the database's one write lock, not queue behind it."""
    receive(sessions, event("w1"), settings=settings)
    answers: list[bool] = []
    with sessions() as writer:
        # A write in progress, uncommitted: on SQLite the write lock is held from here.
        writer.execute(update(MediaItem).values(caption="being written"))
        asking = threading.Thread(target=lambda: answers.append(any_unwoken(sessions)))
        asking.start()
        asking.join(timeout=10.0)
        finished = not asking.is_alive()
        writer.rollback()
    asking.join()
    assert finished, "the question waited for the writer"
    assert answers == [True]


def test_a_refusing_broker_leaves_the_rows_for_the_next_pass(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    receive(sessions, event("w1"), event("w2"), settings=settings)
    with pytest.raises(SchedulerUnavailable):
        relay_pass(sessions, RefusingScheduler(), settings)
    assert set(stamps(sessions).values()) == {None}  # unstamped: not waiting for a lease
    scheduler = RecordingScheduler()
    assert relay_pass(sessions, scheduler, settings) == 2
    assert len(scheduler.take()) == 2


def test_a_pass_takes_a_backlog_in_several_statements(
    sessions: sessionmaker[Session], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ingest.wake_relay.TAKE_LIMIT", 3)
    receive(sessions, *(event(f"w{i}") for i in range(7)), settings=settings)
    scheduler = RecordingScheduler()
    assert relay_pass(sessions, scheduler, settings) == 7
    assert len({job.media_item_id for job in scheduler.take()}) == 7


@pytest.mark.postgres
def test_concurrent_relays_split_the_rows_and_wake_each_once(
    database_url: str, session_factory_for: Any, settings: Settings
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite has a single writer")
    receive(
        session_factory_for(database_url),
        *(event(f"w{i}") for i in range(600)),
        settings=settings,
    )
    relays = [session_factory_for(database_url) for _ in range(4)]
    schedulers = [RecordingScheduler() for _ in relays]
    start = threading.Barrier(len(relays))

    def run(index: int) -> None:
        start.wait()
        relay_pass(relays[index], schedulers[index], settings)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(relays))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    woken = [job.media_item_id for s in schedulers for job in s.jobs]
    assert len(woken) == len(set(woken)) == 600


# --- grouping into messages -----------------------------------------------------------------


def test_wake_ups_give_a_message_what_one_process_starts_at_once() -> None:
    jobs = [DownloadJob(i, SMALL_MEDIA) for i in range(1, 41)] + [DownloadJob(99, LARGE_MEDIA)]

    def sizes(count: int, most: int, spread: int) -> list[int]:
        return [len(m.media_item_ids) for m in wake_ups(jobs[:count], most=most, spread=spread)]

    # Up to a process's slots (spread) to a message, shared evenly over the fewest messages:
    # live traffic shares its messages, and a burst of more reaches several processes.
    assert sizes(5, most=16, spread=8) == [5]
    assert sizes(20, most=16, spread=8) == [7, 7, 6]
    assert sizes(40, most=16, spread=8) == [8] * 5
    assert wake_ups(jobs[:1], most=16, spread=8) == [WakeUp(SMALL_MEDIA, (1,))]
    # A backlog past most x spread rows goes most to a message.
    assert sizes(40, most=4, spread=8) == [4] * 10
    assert sizes(40, most=4, spread=2) == [4] * 10
    assert sizes(6, most=4, spread=8) == [3, 3]  # never more than most, backlog or not
    messages = wake_ups(jobs, most=4, spread=8)
    small = [m for m in messages if m.queue == SMALL_MEDIA]
    assert sorted(i for m in small for i in m.media_item_ids) == list(range(1, 41))
    assert [m for m in messages if m.queue == LARGE_MEDIA] == [WakeUp(LARGE_MEDIA, (99,))]
    # Large media never wait for a slot behind each other's transfers with a lease running.
    large = [DownloadJob(i, LARGE_MEDIA) for i in range(1, 41)]
    assert {len(m.media_item_ids) for m in wake_ups(large, most=4, spread=2)} == {1}
    # A pool that runs one row at a time per process (prefork, solo, gevent): one row to a
    # message, unless past most x spread rows.
    many = [DownloadJob(i, SMALL_MEDIA) for i in range(1, 301)]
    assert {len(m.media_item_ids) for m in wake_ups(many[:40], 16, 8, at_once=1)} == {1}
    assert {len(m.media_item_ids) for m in wake_ups(many, 16, 8, at_once=1)} == {16, 12}


# --- the thread ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "not within the timeout"
        time.sleep(0.01)
    return time.monotonic() - started


def relay_past_its_first_pass(
    sessions: sessionmaker[Session], settings: Settings
) -> tuple[RelayLoop, RecordingScheduler]:
    """A started relay thread whose first pass (at start, on an empty table) is over."""
    scheduler = RecordingScheduler()
    loop = RelayLoop(sessions, scheduler, settings)
    loop.start()
    time.sleep(0.3)
    return loop, scheduler


def test_the_relay_thread_publishes_committed_rows_within_its_poll_interval(
    sessions: sessionmaker[Session], make_settings: Any, database_url: str
) -> None:
    """The first pass (at start) has found nothing: only the poll explains a prompt
    wake-up, on PostgreSQL as on SQLite (no notification is sent with an insert)."""
    settings = make_settings(database_url=database_url, relay_poll_seconds=0.05)
    loop, scheduler = relay_past_its_first_pass(sessions, settings)
    try:
        receive(sessions, event("w1"), settings=settings)
        waited = wait_until(lambda: len(scheduler.jobs) == 1, timeout=10.0)
        assert waited < 5.0
        receive(sessions, event("w2"), event("w3"), settings=settings)
        wait_until(lambda: len(scheduler.jobs) == 3, timeout=10.0)
    finally:
        started = time.monotonic()
        loop.stop()
        assert time.monotonic() - started < 5.0
    assert not any_unwoken(sessions)


def test_rows_committed_while_the_relay_sleeps_wait_for_its_next_poll(
    sessions: sessionmaker[Session], make_settings: Any, database_url: str
) -> None:
    """Nothing but the poll wakes the relay: with the poll 30 s away, a row committed after
    the first pass is not relayed in the next second."""
    settings = make_settings(database_url=database_url, relay_poll_seconds=30.0)
    loop, scheduler = relay_past_its_first_pass(sessions, settings)
    try:
        receive(sessions, event("w1"), settings=settings)
        time.sleep(1.0)
        assert scheduler.jobs == []
        assert any_unwoken(sessions)
    finally:
        loop.stop()


def test_rows_committed_before_the_relay_started_are_published_at_its_start(
    sessions: sessionmaker[Session], make_settings: Any, database_url: str
) -> None:
    """The next poll is 30 s away: only a first pass at start explains a prompt wake-up
    (a restarted worker's backlog)."""
    settings = make_settings(database_url=database_url, relay_poll_seconds=30.0)
    receive(sessions, event("w1"), event("w2"), settings=settings)
    scheduler = RecordingScheduler()
    loop = RelayLoop(sessions, scheduler, settings)
    loop.start()
    try:
        waited = wait_until(lambda: len(scheduler.jobs) == 2, timeout=10.0)
        assert waited < 5.0
    finally:
        loop.stop()


def test_the_relay_thread_outlives_a_refusing_broker(
    sessions: sessionmaker[Session], make_settings: Any, database_url: str
) -> None:
    settings = make_settings(database_url=database_url, relay_poll_seconds=0.2)

    class FlakyScheduler(RecordingScheduler):
        refusals = 2

        def schedule(self, jobs: Sequence[DownloadJob]) -> None:
            if self.refusals:
                self.refusals -= 1
                raise SchedulerUnavailable("ConnectionRefusedError")
            super().schedule(jobs)

    scheduler = FlakyScheduler()
    receive(sessions, event("w1"), settings=settings)
    loop = RelayLoop(sessions, scheduler, settings)
    loop.start()
    try:
        wait_until(lambda: len(scheduler.jobs) == 1, timeout=15.0)
    finally:
        loop.stop()
    assert scheduler.refusals == 0


def test_take_unwoken_stamps_only_pending_rows_without_a_wake_up(session: Session) -> None:
    now = utcnow()
    instance = make_instance(session)
    fresh = make_media_item(session, instance)
    stamped = make_media_item(session, instance, enqueued_at=now - timedelta(seconds=5))
    make_media_item(session, instance, state=MediaState.DOWNLOADING)
    session.commit()
    at = utcnow()
    taken = media_rows.take_unwoken(session, at, 10)
    session.commit()
    assert [row[0] for row in taken] == [fresh.id]
    session.expire_all()
    assert fresh.enqueued_at == at
    assert stamped.enqueued_at == now - timedelta(seconds=5)
