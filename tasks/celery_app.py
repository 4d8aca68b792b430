"""The Celery application: every reliability setting lives here, at app level.

Per-task keywords are avoided on purpose: Celery silently accepts a misspelt one.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.utils.url import maybe_sanitize_url

from ingest.queues import ALL_QUEUES, SMALL_MEDIA
from ingest.settings import Settings
from tasks import lifecycle, redis_transport

# One row per message: what the receiver published before the relay. Still consumed, so
# messages left in a queue across an upgrade run.
DOWNLOAD_TASK = "ingest.download_media"
# Several rows per message (the relay and the reconciler publish these).
DOWNLOAD_BATCH_TASK = "ingest.download_batch"
RECONCILE_TASK = "ingest.reconcile"
RETENTION_TASK = "ingest.purge_retention"
# Retention is counted in days: an hour late is no matter, and a pass over nothing is cheap.
RETENTION_INTERVAL = timedelta(hours=1)


# Celery logs two INFO lines per task ("received", "succeeded"); the pipeline already logs
# one line per attempt saying more (item, instance, outcome, state, duration), and at hundreds
# of items a second the duplicates cost measurable CPU (docs/PERFORMANCE.md). Failures still
# show (a task that raises is logged at ERROR), and at DEBUG Celery's own lines come back.
DUPLICATE_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def quiet_duplicate_task_lines(settings: Settings) -> None:
    """Call at ``worker_init``, before the consumer builds its task strategies (they read
    the level)."""
    if settings.log_level != "DEBUG":
        for name in DUPLICATE_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def _transport(settings: Settings) -> str | None:
    """Our Redis transport for ``redis://`` (see tasks.redis_transport); kombu's otherwise.

    ``rediss://`` keeps kombu's own transport: kombu switches TLS on by that transport name.
    """
    scheme = settings.broker_url.split(":", 1)[0]
    return redis_transport.TRANSPORT if scheme == "redis" else None


def _transport_options(settings: Settings) -> dict[str, object]:
    scheme = settings.broker_url.split(":", 1)[0]
    if scheme in ("redis", "rediss"):
        # Redis redelivers unacked messages after the visibility timeout; it must outlive
        # the longest task. Backoff is never a long countdown: it lives in SQL.
        options: dict[str, object] = {
            "visibility_timeout": int(settings.lease_seconds + 60),
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        }
        if settings.broker_prefix:
            options["global_keyprefix"] = f"{settings.broker_prefix}:"
        return options
    # The SQLAlchemy transport hands its options to create_engine; it has no visibility
    # timeout (messages are deleted when consumed, redelivered by the reconciler).
    return {}


class BrokerConnection(Connection):
    """A kombu connection whose log lines show the broker URL as configured.

    kombu writes ``:**@`` into every URL it prints, password or not (``redis://:**@host``),
    and names a transport given by import path by that path
    (``tasks.redis_transport:Transport://...``). Celery prints ``as_uri()`` in the worker's
    and beat's banner and in its "Connected to" and connection-error lines.
    """

    def as_uri(
        self, include_password: bool = False, mask: str = "**", *args: Any, **kwargs: Any
    ) -> str:
        uri = super().as_uri(True, mask, *args, **kwargs)
        if uri.startswith(f"{redis_transport.TRANSPORT}://"):
            uri = "redis" + uri.removeprefix(redis_transport.TRANSPORT)
        if include_password:
            return uri
        # Masks the password only where there is one.
        sanitized: str = maybe_sanitize_url(uri, mask)
        return sanitized


class _AMQP(AMQP):  # type: ignore[misc]
    Connection = BrokerConnection


def _queue(name: str) -> Queue:
    # A direct exchange of the queue's own name, bound by that name, as Celery declares its
    # default queue. Queue(name) alone was given the default queue's exchange and routing key
    # (media.small) for every queue. Publishing is unchanged: Celery and tasks.dispatch send
    # to the anonymous exchange, routing key = queue name.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_celery(settings: Settings) -> Celery:
    app = Celery(
        "ingest", broker=settings.broker_url, include=["tasks.media", "tasks.retention"], amqp=_AMQP
    )
    app.conf.update(
        # Safe formats only; results are never read (state lives in SQL).
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # A task is acknowledged after it ran, and a worker that dies mid-task gives its
        # message back. Tasks are idempotent (claim by lease), so a redelivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        broker_transport=_transport(settings),
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # Retry forever. Celery's default gives up after 100 attempts (about 45 minutes at
        # its 30 s cap) and the worker stops: a broker outage of any length is ridden out
        # instead, and the worker consumes again within 30 s of the broker's return.
        broker_connection_max_retries=None,
        # After a reconnect Celery 5.7 lowers the prefetch count by the tasks still running
        # and raises it again as they finish. On RabbitMQ, with a task running across the
        # cut (its ack then fails on the old connection), the worker stopped taking new
        # messages in 2 of 3 runs of tests/tasks/test_broker_outage.py; without the reduction,
        # 3 of 3 passed. Prefetch is one per thread, so the reduction saves nothing here.
        worker_enable_prefetch_count_reduction=False,
        # The webhook must answer fast even if the broker is down: one quick attempt,
        # then the reconciler is the safety net.
        task_publish_retry=False,
        broker_connection_timeout=2,
        task_queues=[_queue(name) for name in ALL_QUEUES],
        task_default_queue=SMALL_MEDIA,
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": timedelta(seconds=settings.reconcile_interval_seconds),
                "options": {"queue": "maintenance", "expires": settings.reconcile_interval_seconds},
            },
            "retention": {
                "task": RETENTION_TASK,
                "schedule": RETENTION_INTERVAL,
                "options": {
                    "queue": "maintenance",
                    "expires": int(RETENTION_INTERVAL.total_seconds()),
                },
            },
        },
    )
    app.conf.ingest_settings = settings
    # A worker whose consumer died exits non-zero within a bound (see tasks.lifecycle).
    app.steps["worker"].add(lifecycle.ExitOnFailure)
    return app
