"""The tasks are thin: they call the core. Task functions are called directly; the wiring to
the broker is checked on Celery's in-memory transport (no task_always_eager)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from ingest.budget_releases import BackgroundReleases
from ingest.error_budget import SqlErrorBudget
from ingest.models import Instance, MediaItem, MediaState
from ingest.pipeline import Pipeline
from ingest.queues import LARGE_MEDIA, SMALL_MEDIA, DownloadScheduler, RecordingScheduler
from ingest.services import Services
from ingest.settings import Settings
from tasks import media
from tasks.celery_app import (
    DOWNLOAD_BATCH_TASK,
    DOWNLOAD_TASK,
    DUPLICATE_TASK_LOGGERS,
    RECONCILE_TASK,
    make_celery,
)
from tasks.dispatch import CeleryScheduler
from tests.factories import make_instance, make_media_item
from tests.ingest.test_pipeline import FakeProvider, jpeg


@pytest.fixture(autouse=True)
def _no_runtime() -> Iterator[None]:
    previous = media.install_runtime(None)
    yield
    media.install_runtime(previous)


def install(
    services: Services, provider: FakeProvider, scheduler: DownloadScheduler
) -> media.WorkerRuntime:
    pipeline = Pipeline(
        settings=services.settings,
        sessions=services.sessions,
        storage=services.storage,
        budget=SqlErrorBudget.from_settings(services.sessions, services.settings),
        clients=provider.client,
        rng=random.Random(0),
    )
    runtime = media.WorkerRuntime(services, pipeline, scheduler)
    media.install_runtime(runtime)
    return runtime


def add_item(sessions: sessionmaker[Session], **values: Any) -> int:
    with sessions.begin() as session:
        instance = make_instance(session)
        return make_media_item(session, instance, **values).id


def test_tasks_are_registered_under_the_names_the_app_publishes(make_settings: Any) -> None:
    app = make_celery(make_settings())
    app.loader.import_default_modules()
    assert app.tasks[DOWNLOAD_TASK].name == DOWNLOAD_TASK
    assert app.tasks[DOWNLOAD_BATCH_TASK].name == DOWNLOAD_BATCH_TASK
    assert app.tasks[RECONCILE_TASK].name == RECONCILE_TASK


def test_download_task_runs_one_attempt_through_the_core(services: Services) -> None:
    provider = FakeProvider()
    body = jpeg()
    provider.add("t1", body)
    item_id = add_item(
        services.sessions, media_id="t1", download_url=FakeProvider.webhook_url("t1")
    )
    install(services, provider, RecordingScheduler())

    assert media.download_media(item_id) == "stored"
    assert media.download_media(item_id) == "skipped"  # a redelivery is harmless
    with services.sessions() as session:
        row = session.get(MediaItem, item_id)
        assert row is not None and row.state == MediaState.STORED
        assert row.storage_key is not None
    with services.storage.open(row.storage_key) as stored:
        assert stored.read() == body


def test_a_batch_runs_each_row_in_turn_and_skips_the_rest_once_stopping(
    services: Services,
) -> None:
    provider = FakeProvider()
    ids = []
    for name in ("b1", "b2", "b3"):
        provider.add(name, jpeg())
        ids.append(
            add_item(services.sessions, media_id=name, download_url=FakeProvider.webhook_url(name))
        )
    runtime = install(services, provider, RecordingScheduler())

    assert media.download_batch(ids[:2]) == ["stored", "stored"]
    assert media.download_batch(ids[:2]) == ["skipped", "skipped"]  # a redelivery is harmless
    runtime.pipeline.abandon_all()  # the worker is stopping
    assert media.download_batch(ids[2:]) == ["skipped"]
    with services.sessions() as session:
        row = session.get(MediaItem, ids[2])
        assert row is not None and row.state == MediaState.PENDING  # left for another worker


def drain(app: Celery, queue: str) -> list[Any]:
    messages = []
    with app.connection_for_read() as conn:
        bound = app.amqp.queues[queue](conn.default_channel)
        bound.declare()
        while (message := bound.get(no_ack=True)) is not None:
            messages.append(message)
    return messages


def test_reconcile_task_publishes_wake_ups_to_the_right_queues(
    make_settings: Any, database_url: str, sessions: sessionmaker[Session]
) -> None:
    settings: Settings = make_settings(database_url=database_url, broker_url="memory://")
    app = make_celery(settings)
    for queue in (SMALL_MEDIA, LARGE_MEDIA):
        drain(app, queue)
    small = add_item(sessions, enqueued_at=None)
    large = add_item(sessions, media_type="video", declared_mime="video/mp4", enqueued_at=None)
    services = Services.from_settings(settings)
    try:
        install(services, FakeProvider(), CeleryScheduler(app))
        report = media.reconcile()
    finally:
        services.close()

    assert report["woken"] == 2
    published = {queue: drain(app, queue) for queue in (SMALL_MEDIA, LARGE_MEDIA)}
    assert [m.headers["task"] for m in published[SMALL_MEDIA]] == [DOWNLOAD_BATCH_TASK]
    assert [m.headers["task"] for m in published[LARGE_MEDIA]] == [DOWNLOAD_BATCH_TASK]
    assert published[SMALL_MEDIA][0].decode()[0] == [[small]]
    assert published[LARGE_MEDIA][0].decode()[0] == [[large]]
    # The message carries the row id only: no URL, no secret.
    for message in published[SMALL_MEDIA] + published[LARGE_MEDIA]:
        raw = message.body
        assert "http" not in (raw.decode() if isinstance(raw, bytes) else str(raw))


def test_the_runtime_is_built_once_from_the_apps_settings(make_settings: Any) -> None:
    settings = make_settings()
    app = make_celery(settings)
    built: list[media.WorkerRuntime] = []
    try:
        threads = [
            threading.Thread(target=lambda: built.append(media.runtime(app))) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len({id(runtime) for runtime in built}) == 1
        runtime = built[0]
        assert runtime.services.settings is settings
        # No Redis configured: the SQL budget, its releases sent from a thread of their own.
        assert runtime.pipeline.budget is runtime.releases
        assert isinstance(runtime.releases, BackgroundReleases)
        assert isinstance(runtime.releases.budget, SqlErrorBudget)
        assert isinstance(runtime.scheduler, CeleryScheduler) and runtime.scheduler.app is app
    finally:
        closing = media.install_runtime(None)
        if closing is not None:
            closing.close()


def test_disconnected_instance_rows_are_not_failed_by_the_task(services: Services) -> None:
    with services.sessions.begin() as session:
        instance = make_instance(session)
        instance.connected = False
        item_id = make_media_item(session, instance).id
    install(services, FakeProvider(), RecordingScheduler())
    assert media.download_media(item_id) == "instance_disconnected"
    with services.sessions() as session:
        row = session.get(MediaItem, item_id)
        assert row is not None and row.state == MediaState.PENDING
        assert session.get(Instance, row.instance_id) is not None


@pytest.mark.parametrize(("level", "celery_info_lines"), [("INFO", False), ("DEBUG", True)])
def test_celerys_per_task_lines_are_off_unless_debugging(
    make_settings: Any, level: str, celery_info_lines: bool
) -> None:
    import logging
    from types import SimpleNamespace

    loggers = [logging.getLogger(name) for name in DUPLICATE_TASK_LOGGERS]
    before = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.NOTSET)
        app = make_celery(make_settings(log_level=level))
        media._quiet_duplicate_task_lines(sender=SimpleNamespace(app=app))
        assert [logger.level == logging.NOTSET for logger in loggers] == [celery_info_lines] * 2
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)
