"""The hourly retention task: one pass per period across processes, purging past retention
and pruning old callback events. Called directly, on the runtime a worker would build."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from ingest.error_budget import SqlErrorBudget
from ingest.models import CallbackEvent, MediaItem, MediaState, utcnow
from ingest.pipeline import Pipeline
from ingest.queues import RecordingScheduler
from ingest.services import Services
from tasks import media
from tasks.celery_app import RETENTION_TASK, make_celery
from tasks.retention import purge_retention
from tests.factories import make_instance, make_media_item
from tests.ingest.test_pipeline import FakeProvider


@pytest.fixture(autouse=True)
def _runtime(services: Services) -> Iterator[None]:
    pipeline = Pipeline(
        settings=services.settings,
        sessions=services.sessions,
        storage=services.storage,
        budget=SqlErrorBudget.from_settings(services.sessions, services.settings),
        clients=FakeProvider().client,
        rng=random.Random(0),
    )
    previous = media.install_runtime(media.WorkerRuntime(services, pipeline, RecordingScheduler()))
    yield
    media.install_runtime(previous)


def test_the_task_is_registered_and_scheduled_on_the_maintenance_queue(
    make_settings: Any,
) -> None:
    app = make_celery(make_settings())
    app.loader.import_default_modules()
    assert app.tasks[RETENTION_TASK].name == RETENTION_TASK
    (entry,) = [e for e in app.conf.beat_schedule.values() if e["task"] == RETENTION_TASK]
    assert entry["options"]["queue"] == "maintenance"
    assert entry["schedule"] == timedelta(hours=1)


def test_one_pass_per_period_purges_and_prunes(services: Services) -> None:
    data = b"old photo" * 100
    now = utcnow()
    with services.sessions.begin() as session:
        instance = make_instance(session)
        instance.retention_days = 30
        item = make_media_item(
            session,
            instance,
            state=MediaState.STORED,
            received_at=now - timedelta(days=31),
            storage_key="shop/image/old-1",
        )
        services.storage.put(
            "shop/image/old-1",
            io.BytesIO(data),
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            content_type="image/jpeg",
        )
        for age_days, state in ((8, "delivered"), (8, "failed"), (8, "pending"), (1, "delivered")):
            session.add(
                CallbackEvent(
                    event_id=f"evt_{age_days}_{state}",
                    instance_id=instance.id,
                    media_item_id=item.id,
                    event_type="media.stored",
                    body="{}",
                    state=state,
                    attempts=1,
                    next_attempt_at=now,
                    created_at=now - timedelta(days=age_days),
                )
            )
        item_id = item.id

    report = purge_retention()

    assert report is not None
    assert report["purged"] == 1 and report["callback_events_pruned"] == 2
    with services.sessions() as session:
        row = session.get(MediaItem, item_id)
        assert row is not None and row.state == MediaState.PURGED
        kept = sorted(e.event_id for e in session.query(CallbackEvent))
    assert kept == ["evt_1_delivered", "evt_8_pending"]
    with pytest.raises(FileNotFoundError):
        services.storage.head("shop/image/old-1")
    # A second beat (or the next tick too early) finds the turn taken.
    assert purge_retention() is None
