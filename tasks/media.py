"""The download and reconcile tasks: thin adapters that translate a task message into a call
on the core (ingest.pipeline, ingest.reconciler).

A worker process builds its long-lived parts once, lazily and thread-safely, from the app's
``ingest_settings``: one Services (SQL engine, storage, Redis), one Egress (the outbound
HTTP pool, shared by every thread), one error budget and one Pipeline. Tests and embedders
may install their own with :func:`install_runtime`.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery, Task, shared_task
from celery.signals import worker_init, worker_shutdown

from ingest.egress import Egress
from ingest.pipeline import Pipeline
from ingest.providers import Credentials, ProviderClient, client_for
from ingest.queues import DownloadScheduler
from ingest.reconciler import reconcile as reconcile_rows
from ingest.services import Services
from ingest.settings import Settings
from tasks.celery_app import DOWNLOAD_TASK, RECONCILE_TASK, quiet_duplicate_task_lines
from tasks.dispatch import CeleryScheduler

log = logging.getLogger(__name__)

# Under load a worker's connections go back and forth within milliseconds; one that sat this
# long may have been cut by a server restart, a proxy or a firewall, and is checked first.
WORKER_PING_AFTER_IDLE_SECONDS = 5.0


@dataclass
class WorkerRuntime:
    services: Services
    pipeline: Pipeline
    scheduler: DownloadScheduler
    egress: Egress | None = None

    def close(self) -> None:
        if self.egress is not None:
            self.egress.close()
        self.services.close()


def _worker_services(settings: Settings) -> Services:
    """Services whose SQL pool holds a connection for every worker thread.

    The default pool keeps 5 idle connections: with 16 threads, every connection past the
    fifth was opened and closed again for almost every claim and finish (a server process
    forked each time), which cost more CPU than the rest of the SQL work. A connection is
    pinged only after sitting idle (:data:`WORKER_PING_AFTER_IDLE_SECONDS`), not on every one
    of the two checkouts per item.
    """
    return Services.from_settings(
        settings,
        pool_size=settings.worker_concurrency + 2,
        ping_after_idle=WORKER_PING_AFTER_IDLE_SECONDS,
    )


def build_runtime(settings: Settings, *, scheduler: DownloadScheduler) -> WorkerRuntime:
    services = _worker_services(settings)
    egress = Egress(settings)

    # A client is a few parsed origins around the shared egress pool: built once per
    # instance's credentials (a changed key is a new entry), not once per download.
    @functools.lru_cache(maxsize=1024)
    def clients(credentials: Credentials) -> ProviderClient:
        return client_for(credentials, settings, egress)

    return WorkerRuntime(services, Pipeline.for_services(services, clients), scheduler, egress)


_lock = threading.Lock()
_runtime: WorkerRuntime | None = None


def runtime(app: Celery) -> WorkerRuntime:
    """This process's runtime, built on first use from the app's settings."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                settings: Settings = app.conf.ingest_settings
                _runtime = build_runtime(settings, scheduler=CeleryScheduler(app))
    return _runtime


def install_runtime(new: WorkerRuntime | None) -> WorkerRuntime | None:
    """Replace this process's runtime (tests, embedding); returns the previous one."""
    global _runtime
    with _lock:
        previous, _runtime = _runtime, new
    return previous


@worker_init.connect
def _quiet_duplicate_task_lines(sender: Any = None, **_: Any) -> None:
    # At worker_init, before the consumer builds its task strategies (they read the level).
    app = getattr(sender, "app", None)
    settings: Settings | None = getattr(getattr(app, "conf", None), "ingest_settings", None)
    if settings is not None:
        quiet_duplicate_task_lines(settings)


@worker_init.connect
def _build_runtime_at_start(sender: Any = None, **_: Any) -> None:
    # Build before the worker reports ready, not inside the first tasks: the S3 client and
    # the egress pool cost about a second of CPU, which otherwise lands on the first wave
    # of downloads, and a worker that cannot build its runtime should fail at start.
    app = getattr(sender, "app", None)
    if app is not None and getattr(app.conf, "ingest_settings", None) is not None:
        runtime(app)


@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    previous = install_runtime(None)
    if previous is not None:
        previous.close()


# bind=True: the task's own app, not the thread-local current_app (pool threads have none).
@shared_task(name=DOWNLOAD_TASK, bind=True)
def download_media(self: Task, media_item_id: int) -> str:
    """Claim the row, try once, record the outcome. Repeats and duplicates are harmless."""
    return runtime(self.app).pipeline.run(int(media_item_id)).outcome


@shared_task(name=RECONCILE_TASK, bind=True)
def reconcile(self: Task) -> dict[str, Any]:
    current = runtime(self.app)
    report = reconcile_rows(current.services.sessions, current.scheduler, current.services.settings)
    return asdict(report)
