"""The worker benchmark's ceiling: the baseline loop's work, and nothing else, as a Celery task.

``bench.worker_bench`` measures three ways of copying the same media from the CDN to S3:

1. the baseline, a plain thread pool that GETs each URL with httpx and puts it with boto3;
2. this module: the same two calls inside a Celery task, on the worker's own Celery
   configuration (``tasks.celery_app.make_celery``: broker, transport, late acks, prefetch)
   and the same pool, processes and threads as ``ingest worker``;
3. ``ingest worker`` itself, which also claims the row with a lease, guards every provider
   call with the error budget, verifies size, sha256 and type, and records the copy in SQL.

(2) is what Celery alone costs; the gap from (2) to (3) is what the worker's durability and
safety cost. This is a benchmark device, not part of the service: a task message carries only
an index into a plan file the benchmark wrote (no URL in the broker), and every copy counts
itself in Redis so the benchmark knows when all are done.

Environment (set by ``bench.worker_bench``): the stack's ``INGEST_*`` settings, plus
``BENCH_BARE_PLAN`` (JSON list of ``[url, key]``), ``BENCH_BARE_BUCKET``,
``BENCH_BARE_API_KEY`` (the CDN's bearer key) and ``BENCH_BARE_COUNTER`` (a Redis key).
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery.signals import worker_init

from ingest.queues import SMALL_MEDIA
from ingest.settings import Settings
from tasks.celery_app import make_celery, quiet_duplicate_task_lines

TASK = "bench.bare_copy"

settings = Settings()
app = make_celery(settings)
# Only this module's task: the service's tasks (and the runtime they build) stay out.
app.conf.include = []


class _Clients:
    """What the baseline loop holds: one httpx client and one boto3 client per process."""

    def __init__(self) -> None:
        import boto3
        import httpx
        import redis

        with open(os.environ["BENCH_BARE_PLAN"]) as plan:
            self.plan: list[list[str]] = json.load(plan)
        self.bucket = os.environ["BENCH_BARE_BUCKET"]
        self.headers = {"Authorization": f"Bearer {os.environ['BENCH_BARE_API_KEY']}"}
        self.counter = os.environ["BENCH_BARE_COUNTER"]
        self.http = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=32))
        self.s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
        assert settings.redis_url is not None, "the bare Celery ceiling needs Redis"
        self.redis = redis.Redis.from_url(settings.redis_url)


_clients: _Clients | None = None


@worker_init.connect
def _prepare(**_: Any) -> None:
    # As tasks.media does: Celery's per-task lines quieted, and the clients built before the
    # worker reports ready, so neither costs CPU inside the timed run.
    global _clients
    quiet_duplicate_task_lines(settings)
    _clients = _Clients()


@app.task(name=TASK)
def bare_copy(index: int) -> None:
    held = _clients
    assert held is not None, "built at worker_init"
    url, key = held.plan[index]
    response = held.http.get(url, headers=held.headers)
    response.raise_for_status()
    held.s3.put_object(Bucket=held.bucket, Key=key, Body=response.content)
    held.redis.incr(held.counter)


def publish(count: int) -> None:
    """One message per item, on the queue ``ingest worker`` reads for small media."""
    with app.producer_or_acquire() as producer:
        for index in range(count):
            app.send_task(TASK, (index,), queue=SMALL_MEDIA, producer=producer)


if __name__ == "__main__":
    # ``python -m bench.bare_celery COUNT``: publish with the stack's settings (environment).
    import sys

    publish(int(sys.argv[1]))
