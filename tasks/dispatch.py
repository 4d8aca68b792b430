"""The webhook's side of the queue: publish download jobs by task name.

Publishing by name keeps the web process free of task code and its imports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from ingest.queues import DownloadJob, SchedulerUnavailable
from ingest.settings import Settings
from tasks.celery_app import DOWNLOAD_TASK, make_celery

log = logging.getLogger(__name__)


class CeleryScheduler:
    def __init__(self, app: Celery) -> None:
        self.app = app

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
        try:
            with self.app.producer_or_acquire() as producer:
                for job in jobs:
                    self.app.send_task(
                        DOWNLOAD_TASK,
                        args=[job.media_item_id],
                        queue=job.queue,
                        producer=producer,
                    )
        except (OperationalError, KombuError, OSError) as exc:
            raise SchedulerUnavailable(type(exc).__name__) from exc

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
