"""Our Redis transport: one client per channel, same bookkeeping as kombu's."""

import os
from typing import Any

import pytest
import redis

from ingest.queues import SMALL_MEDIA, DownloadJob
from tasks import redis_transport
from tasks.celery_app import make_celery
from tasks.dispatch import CeleryScheduler
from tests.conftest import skip_or_fail, unique_key_prefix


@pytest.fixture
def redis_settings(make_settings: Any) -> Any:
    url = os.environ.get("INGEST_TEST_REDIS_URL")
    if not url:
        skip_or_fail("INGEST_TEST_REDIS_URL is not set (Redis broker tests)")
    assert url is not None
    prefix = unique_key_prefix()
    yield make_settings(broker_url=url, broker_prefix=prefix)
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def test_redis_urls_select_our_transport_and_others_do_not(make_settings: Any) -> None:
    redis_app = make_celery(make_settings(broker_url="redis://127.0.0.1:6379/0"))
    assert redis_app.conf.broker_transport == redis_transport.TRANSPORT
    for url in ("rediss://127.0.0.1:6380/0", "amqp://guest@127.0.0.1//"):
        assert make_celery(make_settings(broker_url=url)).conf.broker_transport is None
    # rediss keeps kombu's transport, which is what switches TLS on.
    tls_app = make_celery(make_settings(broker_url="rediss://127.0.0.1:6380/0"))
    with tls_app.connection_for_write() as connection:
        assert connection.ssl


def test_a_channel_reuses_one_client_until_its_pool_is_replaced(redis_settings: Any) -> None:
    app = make_celery(redis_settings)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        assert isinstance(channel, redis_transport.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
            assert first.connection_pool is channel.pool
        given = object()
        with channel.conn_or_acquire(given) as passed:
            assert passed is given
        # What kombu does after a fork: the old pool is dropped, so is the client on it.
        channel._disconnect_pools()  # type: ignore[no-untyped-call]
        with channel.conn_or_acquire() as third:
            assert third is not first
            assert third.connection_pool is channel.pool


def test_delivery_and_ack_bookkeeping_work_through_the_shared_client(
    redis_settings: Any,
) -> None:
    CeleryScheduler.from_settings(redis_settings).schedule([DownloadJob(9, SMALL_MEDIA)])
    app = make_celery(redis_settings)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        message = channel.basic_get(SMALL_MEDIA, no_ack=False)
        assert message is not None
        unacked = channel.unacked_key
        with channel.conn_or_acquire() as client:
            # Recorded as unacked on delivery (the redelivery safety net) ...
            assert client.hget(unacked, message.delivery_tag) is not None
            message.ack()
            # ... and gone once acknowledged.
            assert client.hget(unacked, message.delivery_tag) is None
