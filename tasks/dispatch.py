"""Publishing wake-ups by task name: the relay's and the reconciler's side of the queue.

Publishing by name keeps the publisher free of task code and its imports. Rows go several to
a message (:func:`ingest.queues.wake_ups`), so Celery's cost per message is shared.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from ingest.queues import DownloadJob, SchedulerUnavailable, wake_ups
from ingest.settings import Settings
from tasks.celery_app import DOWNLOAD_BATCH_TASK, make_celery


class CeleryScheduler:
    def __init__(
        self, app: Celery, *, wake_batch: int = 1, spread: int = 1, at_once: int | None = None
    ) -> None:
        self.app = app
        self._wake_batch = wake_batch
        self._spread = spread
        self._at_once = at_once
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
        return cls.for_settings(app, settings)

    @classmethod
    def for_settings(cls, app: Celery, settings: Settings) -> CeleryScheduler:
        """Messages shaped for workers configured like ``settings`` (ingest.queues.wake_ups)."""
        return cls(
            app,
            wake_batch=settings.wake_batch,
            spread=settings.worker_concurrency,
            at_once=settings.rows_side_by_side,
        )

    def schedule(self, jobs: Sequence[DownloadJob]) -> None:
        if not jobs:
            return
        messages = wake_ups(jobs, self._wake_batch, self._spread, self._at_once)
        # Resolved before publishing: kombu counts KeyError among Redis connection errors, and
        # an unknown queue name is a bug to raise, not a broker outage to wait out.
        for message in messages:
            self.app.amqp.queues[message.queue]
        try:
            with self.app.producer_or_acquire() as producer:
                for message in messages:
                    self.app.send_task(
                        DOWNLOAD_BATCH_TASK,
                        args=(list(message.media_item_ids),),
                        queue=message.queue,
                        producer=producer,
                        ignore_result=True,
                        retry=False,
                    )
        except self._publish_errors as exc:
            raise SchedulerUnavailable(type(exc).__name__) from exc

    def queue_depths(self, queues: Sequence[str]) -> dict[str, int]:
        # A declare answers with the queue's message count on every transport (on Redis an
        # empty queue has no key, so a passive declare would call it missing). On a pooled
        # connection: one made per call cost more CPU than a relay pass (kombu looks its
        # transport up among the installed packages' entry points each time).
        try:
            with self.app.pool.acquire(block=True) as conn:
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
