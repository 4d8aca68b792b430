"""The wake-up publisher (the relay's and the reconciler's): rows reach their queue as JSON task
messages, several rows to a message, and a broker outage fails fast."""

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis
from sqlalchemy.orm import Session, sessionmaker

from ingest.models import MediaItem, utcnow
from ingest.queues import LARGE_MEDIA, SMALL_MEDIA, DownloadJob, SchedulerUnavailable
from ingest.reconciler import reconcile
from ingest.settings import Settings
from tasks.celery_app import DOWNLOAD_BATCH_TASK, make_celery
from tasks.dispatch import CeleryScheduler
from tests.conftest import skip_or_fail, unique_key_prefix
from tests.factories import make_instance, make_media_item


def _redis_broker() -> str:
    url = os.environ.get("INGEST_TEST_REDIS_URL")
    if not url:
        skip_or_fail("INGEST_TEST_REDIS_URL is not set (Redis broker tests)")
    assert url is not None
    return url


def test_jobs_are_published_by_task_name_to_their_queue(make_settings: Any) -> None:
    import redis

    url = _redis_broker()
    prefix = unique_key_prefix()
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url=url, broker_prefix=prefix))
    scheduler.schedule([DownloadJob(7, SMALL_MEDIA), DownloadJob(8, LARGE_MEDIA)])

    client = redis.Redis.from_url(url)
    try:
        small = [json.loads(m) for m in client.lrange(f"{prefix}:{SMALL_MEDIA}", 0, -1)]
        large = [json.loads(m) for m in client.lrange(f"{prefix}:{LARGE_MEDIA}", 0, -1)]
        assert [m["headers"]["task"] for m in small + large] == [DOWNLOAD_BATCH_TASK] * 2
        bodies = [json.loads(base64.b64decode(m["body"])) for m in small + large]
        assert [body[0] for body in bodies] == [[[7]], [[8]]]
        assert all(m["content-type"] == "application/json" for m in small + large)
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


def _amqp_broker() -> str:
    url = os.environ.get("INGEST_TEST_AMQP_URL")
    if not url:
        skip_or_fail("INGEST_TEST_AMQP_URL is not set (RabbitMQ broker tests)")
    assert url is not None
    return url


def _settled_depths(scheduler: CeleryScheduler, expected: dict[str, int]) -> dict[str, int]:
    """The depths of ``expected``'s queues once they read ``expected``, or as they read
    after 5 s.

    RabbitMQ orders nothing across connections: the publish went out on a producer's
    connection and the count is asked on another, so a count taken at once can miss a
    message still being routed (CI saw 1 for 2). Redis and the SQL broker answer at once.
    """
    deadline = time.monotonic() + 5.0
    while (depths := scheduler.queue_depths(list(expected))) != expected:
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return depths


@pytest.mark.parametrize("broker", ["redis", "amqp", "sqla"])
def test_queue_depths_count_the_wake_ups_waiting(
    make_settings: Any, tmp_path: Any, broker: str
) -> None:
    """The reconciler re-sends a row's wake-up early only when its queue is empty: the
    count must be right on every broker, an empty Redis queue (no key at all) included."""
    prefix = unique_key_prefix()
    url = {
        "redis": _redis_broker,
        "amqp": _amqp_broker,
        "sqla": lambda: f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
    }[broker]()
    settings = make_settings(broker_url=url, broker_prefix=prefix)
    scheduler = CeleryScheduler.from_settings(settings)
    small, large = f"{SMALL_MEDIA}.{prefix}", f"{LARGE_MEDIA}.{prefix}"
    if broker == "amqp":
        # One RabbitMQ for every run: queues of this test's own, deleted at the end.
        from kombu import Queue

        scheduler.app.amqp.queues[small] = Queue(small, auto_delete=True)
        scheduler.app.amqp.queues[large] = Queue(large, auto_delete=True)
    else:
        small, large = SMALL_MEDIA, LARGE_MEDIA
    try:
        assert scheduler.queue_depths([small, large]) == {small: 0, large: 0}
        scheduler.schedule([DownloadJob(1, small), DownloadJob(2, small), DownloadJob(3, large)])
        scheduler.schedule([DownloadJob(4, small)])
        # Messages, not rows: the first two small rows share one (ingest.queues.wake_ups).
        assert _settled_depths(scheduler, {small: 2, large: 1}) == {small: 2, large: 1}
    finally:
        with scheduler.app.connection_for_write() as conn:
            for name in (small, large):
                conn.default_channel.queue_purge(name)
                if broker == "amqp":
                    conn.default_channel.queue_delete(name)


def test_a_broker_that_is_down_cannot_count_its_queues(make_settings: Any) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url="redis://127.0.0.1:1/0"))
    with pytest.raises(SchedulerUnavailable):
        scheduler.queue_depths([SMALL_MEDIA])


@pytest.mark.parametrize(
    "broker_url", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"]
)
def test_an_unreachable_broker_is_reported_not_retried(make_settings: Any, broker_url: str) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url=broker_url))
    # One connection attempt: kombu's retry loop is off (the relay tries again next pass).
    assert scheduler.app.conf.broker_transport_options["max_retries"] == 0
    with pytest.raises(SchedulerUnavailable):
        scheduler.schedule([DownloadJob(1, SMALL_MEDIA)])


def break_the_pooled_connection(
    scheduler: CeleryScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled producer whose connection broke under it: the client library's own error."""
    import redis

    @contextlib.contextmanager
    def pooled_producer(producer: Any = None) -> Iterator[None]:
        yield None

    def send_task(*args: Any, **kwargs: Any) -> None:
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(scheduler.app, "producer_or_acquire", pooled_producer)
    monkeypatch.setattr(scheduler.app, "send_task", send_task)


def test_a_broken_pooled_redis_connection_is_reported_as_unavailable(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url="redis://127.0.0.1:1/0"))
    break_the_pooled_connection(scheduler, monkeypatch)
    with pytest.raises(SchedulerUnavailable, match="ConnectionError"):
        scheduler.schedule([DownloadJob(1, SMALL_MEDIA)])


def test_a_reconcile_pass_survives_a_broken_pooled_connection(
    make_settings: Any,
    sessions: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with sessions.begin() as session:
        item_id = make_media_item(session, make_instance(session), enqueued_at=None).id
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url="redis://127.0.0.1:1/0"))
    break_the_pooled_connection(scheduler, monkeypatch)
    report = reconcile(sessions, scheduler, settings, now=utcnow() + timedelta(seconds=1))
    assert report.publish_failed and report.woken == 0
    with sessions() as session:
        item = session.get(MediaItem, item_id)
        assert item is not None and item.enqueued_at is None


def test_an_unknown_queue_is_a_bug_not_an_outage(make_settings: Any) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url="redis://127.0.0.1:1/0"))
    with pytest.raises(KeyError):
        scheduler.schedule([DownloadJob(1, "no-such-queue")])


class _Relay:
    """A TCP relay to Redis that can be cut: a broker restart, seen from this process only
    (the test Redis is shared, so it cannot be restarted itself)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_redis_going_away_under_a_pooled_connection_is_reported_as_unavailable(
    make_settings: Any,
) -> None:
    import redis

    url = urlsplit(_redis_broker())
    relay = _Relay(url.hostname or "127.0.0.1", url.port or 6379)
    relayed = urlunsplit(url._replace(netloc=f"127.0.0.1:{relay.port}"))
    prefix = unique_key_prefix()
    scheduler = CeleryScheduler.from_settings(
        make_settings(broker_url=relayed, broker_prefix=prefix)
    )
    try:
        scheduler.schedule([DownloadJob(1, SMALL_MEDIA)])  # the connection is now pooled
        relay.cut()
        with pytest.raises(SchedulerUnavailable):
            scheduler.schedule([DownloadJob(2, SMALL_MEDIA)])
    finally:
        relay.cut()
        client = redis.Redis.from_url(urlunsplit(url))
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


def test_an_empty_batch_touches_no_broker(make_settings: Any) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url="redis://127.0.0.1:1/0"))
    scheduler.schedule([])


def test_a_backlog_goes_several_rows_to_a_message_up_to_the_batch(
    make_settings: Any,
) -> None:
    import redis

    url = _redis_broker()
    prefix = unique_key_prefix()
    settings = make_settings(
        broker_url=url, broker_prefix=prefix, wake_batch=4, worker_concurrency=8
    )
    scheduler = CeleryScheduler.from_settings(settings)
    # 40 rows are a backlog past 4 x 8: the batch's 4 to a message.
    scheduler.schedule([DownloadJob(i, SMALL_MEDIA) for i in range(1, 41)])
    client = redis.Redis.from_url(url)
    try:
        messages = [json.loads(m) for m in client.lrange(f"{prefix}:{SMALL_MEDIA}", 0, -1)]
        rows = [json.loads(base64.b64decode(m["body"]))[0][0] for m in messages]
        assert [len(ids) for ids in rows] == [4] * 10
        assert sorted(i for ids in rows for i in ids) == list(range(1, 41))
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


def test_a_celery_worker_runs_the_published_message(make_settings: Any) -> None:
    url = _redis_broker()
    prefix = unique_key_prefix()
    settings = make_settings(broker_url=url, broker_prefix=prefix)
    scheduler = CeleryScheduler.from_settings(settings)
    scheduler.schedule([DownloadJob(7, SMALL_MEDIA)])

    # An app on kombu's stock Redis transport decodes it as an ordinary task request.
    worker_app = make_celery(settings)
    worker_app.conf.broker_transport = None
    # What a worker does at start-up: import the task modules, so this test runs on its own too.
    worker_app.loader.import_default_modules()
    with worker_app.connection_for_read() as conn:
        channel = conn.default_channel
        try:
            assert type(channel) is kombu_redis.Channel
            message = channel.basic_get(SMALL_MEDIA)
            assert message is not None
            request = Request(message, app=worker_app, task=worker_app.tasks[DOWNLOAD_BATCH_TASK])
            assert request.task_name == DOWNLOAD_BATCH_TASK
            assert request.args == [[7]]
            assert request.kwargs == {}
        finally:
            client = channel.client
            for key in client.scan_iter(f"{prefix}:*"):
                client.delete(key)
