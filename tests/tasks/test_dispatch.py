"""The webhook's publisher: jobs reach the named queue as JSON task messages, fast failure."""

import base64
import json
import os
import uuid
from typing import Any

import pytest
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis

from ingest.queues import LARGE_MEDIA, SMALL_MEDIA, DownloadJob, SchedulerUnavailable
from tasks.celery_app import DOWNLOAD_TASK, make_celery
from tasks.dispatch import CeleryScheduler, download_message
from tests.conftest import skip_or_fail


def _redis_broker() -> str:
    url = os.environ.get("INGEST_TEST_REDIS_URL")
    if not url:
        skip_or_fail("INGEST_TEST_REDIS_URL is not set (Redis broker tests)")
    assert url is not None
    return url


def test_jobs_are_published_by_task_name_to_their_queue(make_settings: Any) -> None:
    import redis

    url = _redis_broker()
    prefix = f"ingest-test-{uuid.uuid4().hex[:8]}"
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url=url, broker_prefix=prefix))
    scheduler.schedule([DownloadJob(7, SMALL_MEDIA), DownloadJob(8, LARGE_MEDIA)])

    client = redis.Redis.from_url(url)
    try:
        small = [json.loads(m) for m in client.lrange(f"{prefix}:{SMALL_MEDIA}", 0, -1)]
        large = [json.loads(m) for m in client.lrange(f"{prefix}:{LARGE_MEDIA}", 0, -1)]
        assert [m["headers"]["task"] for m in small + large] == [DOWNLOAD_TASK] * 2
        bodies = [json.loads(base64.b64decode(m["body"])) for m in small + large]
        assert [body[0] for body in bodies] == [[7], [8]]
        assert all(m["content-type"] == "application/json" for m in small + large)
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()


@pytest.mark.parametrize(
    "broker_url", ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"]
)
def test_an_unreachable_broker_is_reported_not_retried(make_settings: Any, broker_url: str) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url=broker_url))
    # The request path publishes with one connection attempt: kombu's retry loop is off.
    assert scheduler.app.conf.broker_transport_options["max_retries"] == 0
    with pytest.raises(SchedulerUnavailable):
        scheduler.schedule([DownloadJob(1, SMALL_MEDIA)])


def test_an_empty_batch_touches_no_broker(make_settings: Any) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings(broker_url="redis://127.0.0.1:1/0"))
    scheduler.schedule([])


def test_the_prebuilt_message_has_the_fields_send_task_writes(make_settings: Any) -> None:
    scheduler = CeleryScheduler.from_settings(make_settings())
    reference = scheduler.app.amqp.as_task_v2(
        "id-1", DOWNLOAD_TASK, args=[42], kwargs={}, ignore_result=True
    )
    task_id, body, headers = download_message(DownloadJob(42, SMALL_MEDIA), "1@host")
    assert set(headers) == set(reference.headers)
    assert headers["task"] == DOWNLOAD_TASK
    assert headers["id"] == headers["root_id"] == task_id
    assert headers["ignore_result"] is True
    assert headers["argsrepr"] == "[42]"
    args, kwargs, embed = reference.body
    assert body == [list(args), kwargs, embed]


def test_a_celery_worker_runs_the_published_message(make_settings: Any) -> None:
    url = _redis_broker()
    prefix = f"ingest-test-{uuid.uuid4().hex[:8]}"
    settings = make_settings(broker_url=url, broker_prefix=prefix)
    scheduler = CeleryScheduler.from_settings(settings)
    scheduler.schedule([DownloadJob(7, SMALL_MEDIA)])

    # An app on kombu's stock Redis transport decodes it as an ordinary task request.
    worker_app = make_celery(settings)
    worker_app.conf.broker_transport = None
    with worker_app.connection_for_read() as conn:
        channel = conn.default_channel
        try:
            assert type(channel) is kombu_redis.Channel
            message = channel.basic_get(SMALL_MEDIA)
            assert message is not None
            request = Request(message, app=worker_app, task=worker_app.tasks[DOWNLOAD_TASK])
            assert request.task_name == DOWNLOAD_TASK
            assert request.args == [7]
            assert request.kwargs == {}
        finally:
            client = channel.client
            for key in client.scan_iter(f"{prefix}:*"):
                client.delete(key)
