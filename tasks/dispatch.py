"""The webhook's side of the queue: publish download jobs by task name.

Publishing by name keeps the web process free of task code and its imports.

The publish is on the webhook's request path, so it skips two costs of ``send_task`` that buy
nothing here: the message is a pre-built Celery protocol-2 message (fixed task, one integer
argument, no ETA, no result) handed straight to kombu's ``Producer.publish``; and on Redis the
channel reuses one client object for every publish instead of constructing a ``redis.Redis``
per message (``tasks.redis_transport``; kombu's default costs more than the LPUSH itself).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from kombu.messaging import Producer

from ingest.queues import DownloadJob, SchedulerUnavailable
from ingest.settings import Settings
from tasks.celery_app import DOWNLOAD_TASK, make_celery


def download_message(job: DownloadJob, origin: str) -> tuple[str, list[Any], dict[str, Any]]:
    """The Celery protocol-2 message for one download: ``(task id, body, headers)``.

    The same fields ``send_task`` writes (tests compare the two), so any Celery worker reads
    it as an ordinary task message. The body is ``(args, kwargs, embed)``.
    """
    task_id = str(uuid.uuid4())
    args = [job.media_item_id]
    headers: dict[str, Any] = {
        "lang": "py",
        "task": DOWNLOAD_TASK,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": origin,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return task_id, body, headers


class CeleryScheduler:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self._host = socket.gethostname()
        # Every error the transport can raise for a broker that is down or refuses: kombu wraps
        # failures to connect, but a pooled connection that breaks mid-publish (Redis restarted)
        # raises the client library's own error (redis.exceptions.ConnectionError), which must
        # not escape as a 500 after the rows are committed. Built without connecting.
        with app.connection_for_write() as conn:
            self._publish_errors: tuple[type[BaseException], ...] = (
                OperationalError,
                KombuError,
                OSError,
                *conn.connection_errors,
                *conn.channel_errors,
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> CeleryScheduler:
        app = make_celery(settings)
        # The publisher is on the webhook's request path: one quick connection attempt, not
        # kombu's default back-off (seconds). A failure leaves the row to the reconciler.
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "max_retries": 0,
        }
        app.conf.broker_connection_timeout = 1
        return cls(app)

    def schedule(self, jobs: Sequence[DownloadJob]) -> None:
        if not jobs:
            return
        # Resolved before publishing: kombu counts KeyError among Redis connection errors, and
        # an unknown queue name is a bug to raise, not a broker outage to wait out.
        targets = [(self.app.amqp.queues[job.queue], job) for job in jobs]
        try:
            with self.app.producer_or_acquire() as producer:
                for queue, job in targets:
                    self._publish(producer, queue, job)
        except self._publish_errors as exc:
            raise SchedulerUnavailable(type(exc).__name__) from exc

    def _publish(self, producer: Producer, queue: Any, job: DownloadJob) -> None:
        # The pid is read per publish: the scheduler may be built before gunicorn forks.
        task_id, body, headers = download_message(job, f"{os.getpid()}@{self._host}")
        # Anonymous direct exchange, routing key = queue name: where send_task puts it too.
        # Declaring the queue is cached per connection by kombu (one round trip, once).
        producer.publish(
            body,
            exchange="",
            routing_key=queue.name,
            serializer="json",
            headers=headers,
            correlation_id=task_id,
            delivery_mode=2,
            declare=[queue],
            retry=False,
        )

    def queue_depths(self, queues: Sequence[str]) -> dict[str, int]:
        # A declare answers with the queue's message count on every transport (on Redis an
        # empty queue has no key, so a passive declare would call it missing).
        try:
            with self.app.connection_for_write() as conn:
                channel = conn.default_channel
                return {
                    name: int(self.app.amqp.queues[name](channel).queue_declare().message_count)
                    for name in queues
                }
        except self._publish_errors as exc:
            raise SchedulerUnavailable(type(exc).__name__) from exc

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
