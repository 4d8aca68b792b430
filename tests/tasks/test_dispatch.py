"""The webhook's publisher: jobs reach the named queue as JSON task messages, fast failure."""

import base64
import json
import os
import uuid
from typing import Any

import pytest

from ingest.queues import LARGE_MEDIA, SMALL_MEDIA, DownloadJob, SchedulerUnavailable
from tasks.celery_app import DOWNLOAD_TASK
from tasks.dispatch import CeleryScheduler
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
