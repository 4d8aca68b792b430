"""The download and reconcile tasks: thin adapters that translate a task message into a call
on the core (ingest.pipeline, ingest.reconciler), and the worker process's lifecycle.

A worker process builds its long-lived parts once, lazily and thread-safely, from the app's
``ingest_settings``: one Services (SQL engine, storage, Redis), one Egress (the outbound
HTTP pool, shared by every thread), one error budget (its releases sent from a thread of their
own: ingest.budget_releases) and one Pipeline. Tests and embedders
may install their own with :func:`install_runtime`.

At start the worker also starts its wake-up relay (ingest.wake_relay.RelayLoop: publishes the
rows the receiver committed), its reconciler thread (ingest.reconciler.ReconcilerLoop: the
pass never waits behind downloads, and does not depend on beat), its callback thread
(ingest.callback_delivery.CallbackLoop: downstream events, one sender per process) and its
heartbeat (tasks.heartbeat). On SIGTERM it stops taking tasks and lets transfers finish for at most
``worker_shutdown_seconds``; then it hands the rest back (their rows claimable at once by
another worker) and exits, so a supervisor's grace period is never turned into a SIGKILL.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery, Task, shared_task
from celery.signals import worker_init, worker_shutdown, worker_shutting_down

from ingest import logs
from ingest.budget_releases import BackgroundReleases
from ingest.callback_delivery import CallbackLoop, CallbackSender
from ingest.egress import Egress
from ingest.error_budget import budget_for
from ingest.pipeline import Pipeline, new_lease_owner
from ingest.providers import Credentials, ProviderClient, client_for
from ingest.queues import DownloadScheduler
from ingest.reconciler import ReconcileReport, ReconcilerLoop, reconcile_if_its_turn
from ingest.services import Services
from ingest.settings import Settings
from ingest.wake_relay import RelayLoop
from tasks import lifecycle
from tasks.celery_app import (
    DOWNLOAD_BATCH_TASK,
    DOWNLOAD_TASK,
    RECONCILE_TASK,
    quiet_duplicate_task_lines,
)
from tasks.dispatch import CeleryScheduler
from tasks.heartbeat import HeartbeatWriter

log = logging.getLogger(__name__)

# At the shutdown bound, transfers are stopped and handed back; this long is left for their
# threads to notice and for Celery to finish, before the process exits regardless.
HAND_BACK_GRACE_SECONDS = 2.0

# Under load a worker's connections go back and forth within milliseconds; one that sat this
# long may have been cut by a server restart, a proxy or a firewall, and is checked first.
WORKER_PING_AFTER_IDLE_SECONDS = 5.0


@dataclass
class WorkerRuntime:
    services: Services
    pipeline: Pipeline
    scheduler: DownloadScheduler
    egress: Egress | None = None
    reconciler: ReconcilerLoop | None = None
    heartbeat: HeartbeatWriter | None = None
    callback_sender: CallbackSender | None = None
    callback_loop: CallbackLoop | None = None
    relay: RelayLoop | None = None
    releases: BackgroundReleases | None = None

    def reconcile(self) -> ReconcileReport | None:
        """One reconciler pass, if no other process ran one in this interval."""
        return reconcile_if_its_turn(
            self.services.sessions,
            self.scheduler,
            self.services.settings,
            owner=new_lease_owner(),
        )

    def start_background(self) -> None:
        """The threads of a worker process (not of tests that call tasks directly)."""
        settings = self.services.settings
        self.relay = RelayLoop(self.services.sessions, self.scheduler, settings)
        self.relay.start()
        self.reconciler = ReconcilerLoop(self.reconcile, settings.reconcile_interval_seconds)
        self.reconciler.start()
        if self.callback_sender is None:
            self.callback_sender = CallbackSender(settings)
        self.callback_loop = CallbackLoop(
            self.services.sessions, self.callback_sender, settings.callback_interval_seconds
        )
        self.callback_loop.start()
        if settings.worker_heartbeat_file is not None:
            self.heartbeat = HeartbeatWriter(settings.worker_heartbeat_file)
            self.heartbeat.start()

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.callback_loop is not None:
            self.callback_loop.stop()
        if self.callback_sender is not None:
            self.callback_sender.close()
        if self.egress is not None:
            self.egress.close()
        if self.releases is not None:
            self.releases.close()
        self.pipeline.close()
        self.services.close()


def _worker_services(settings: Settings) -> Services:
    """Services whose SQL pool holds a connection for every worker thread.

    The default pool keeps 5 idle connections: with 16 threads, every connection past the
    fifth was opened and closed again for almost every claim and finish (a server process
    forked each time), which cost more CPU than the rest of the SQL work. So one is kept for
    each row slot (the attempts' statements) and for the relay and the reconciler; the Celery
    threads' claims and records, and the callback and release threads, take the overflow at
    a peak: every thread of the process can hold one at once, none waits on the pool. A
    connection is pinged only after sitting idle (:data:`WORKER_PING_AFTER_IDLE_SECONDS`),
    not on every one of the checkouts per item.
    """
    return Services.from_settings(
        settings,
        pool_size=settings.rows_side_by_side + 2,
        max_overflow=settings.worker_concurrency + 4,
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

    # The budget's releases leave the download threads (ingest.budget_releases).
    releases = BackgroundReleases(budget_for(settings, services.sessions, services.redis))
    pipeline = Pipeline.for_services(services, clients, budget=releases)
    return WorkerRuntime(services, pipeline, scheduler, egress, releases=releases)


_lock = threading.Lock()
_runtime: WorkerRuntime | None = None


def runtime(app: Celery) -> WorkerRuntime:
    """This process's runtime, built on first use from the app's settings."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                settings: Settings = app.conf.ingest_settings
                scheduler = CeleryScheduler.for_settings(app, settings)
                _runtime = build_runtime(settings, scheduler=scheduler)
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
        current = runtime(app)
        current.start_background()
        lifecycle.BEFORE_FORCED_EXIT.append(current.pipeline.abandon_all)


@worker_shutting_down.connect
def _bound_the_shutdown(**_: Any) -> None:
    # Sent from the signal handler: only start a timer here.
    current = _runtime
    if current is None or current.reconciler is None:
        return  # not a worker process (a test calling tasks directly)
    bound = current.services.settings.worker_shutdown_seconds
    delay = max(bound - HAND_BACK_GRACE_SECONDS - 1.0, bound / 2)
    timer = threading.Timer(delay, _hand_back_and_exit, args=(current,))
    timer.daemon = True
    timer.start()


def _hand_back_and_exit(current: WorkerRuntime) -> None:
    # The abandoned calls' budget slots are queued to the releases' thread, which sends
    # them during the grace below; nothing here may wait on a store that could be down.
    handed_back = current.pipeline.abandon_all()
    log.warning(
        "worker: shutdown bound of %.0f s reached; %d transfer(s) handed back to other workers",
        current.services.settings.worker_shutdown_seconds,
        handed_back,
    )
    # Celery exits by itself once the stopped transfers return; a thread still blocked in a
    # read (or a broker that does not answer the goodbye) must not hold the process past
    # its bound: every row it held is already handed back, or recorded if its copy was in
    # storage.
    time.sleep(HAND_BACK_GRACE_SECONDS)
    log.warning("worker: exiting at the shutdown bound")
    lifecycle.hard_exit(0)


@worker_shutdown.connect
def _close_runtime(**_: Any) -> None:
    previous = install_runtime(None)
    if previous is not None:
        previous.close()


# bind=True: the task's own app, not the thread-local current_app (pool threads have none).
@shared_task(name=DOWNLOAD_TASK, bind=True)
def download_media(self: Task, media_item_id: int) -> str:
    """Claim the row, try once, record the outcome. Repeats and duplicates are harmless."""
    with logs.task_context(self.request.id, int(media_item_id)):
        return runtime(self.app).pipeline.run(int(media_item_id)).outcome


@shared_task(name=DOWNLOAD_BATCH_TASK, bind=True)
def download_batch(self: Task, media_item_ids: list[int]) -> list[str]:
    """The rows claimed together, then tried side by side, each as :func:`download_media`
    would. A stopping worker hands back the rows it has not started (another worker takes
    them)."""
    results = runtime(self.app).pipeline.run_many(
        [int(item_id) for item_id in media_item_ids],
        row_context=functools.partial(logs.task_context, self.request.id),
    )
    return [result.outcome for result in results]


@shared_task(name=RECONCILE_TASK, bind=True)
def reconcile(self: Task) -> dict[str, Any] | None:
    """Beat's trigger; the pass runs only if no worker's reconciler thread ran it already."""
    with logs.task_context(self.request.id):
        report = runtime(self.app).reconcile()
    return asdict(report) if report is not None else None
