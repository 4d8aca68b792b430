from typing import Any

from ingest.queues import ALL_QUEUES, SMALL_MEDIA
from tasks.celery_app import RECONCILE_TASK, make_celery


def test_reliability_settings_live_at_app_level(make_settings: Any) -> None:
    settings = make_settings(
        broker_url="redis://127.0.0.1:6379/0",
        lease_seconds=1000,
        task_time_limit=600,
        task_soft_time_limit=500,
    )
    conf = make_celery(settings).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_ignore_result is True
    assert conf.task_time_limit == 600
    assert conf.task_soft_time_limit == 500
    # Redis redelivers unacked messages after the visibility timeout: it must outlive a task.
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert {queue.name for queue in conf.task_queues} == set(ALL_QUEUES)
    assert conf.task_default_queue == SMALL_MEDIA


def test_beat_runs_the_reconciler_on_the_maintenance_queue(make_settings: Any) -> None:
    conf = make_celery(make_settings(reconcile_interval_seconds=30)).conf
    entry = conf.beat_schedule["reconcile"]
    assert entry["task"] == RECONCILE_TASK
    assert entry["schedule"].total_seconds() == 30
    assert entry["options"]["queue"] == "maintenance"


def test_redis_broker_keys_can_be_prefixed(make_settings: Any) -> None:
    settings = make_settings(broker_url="redis://127.0.0.1:6379/0", broker_prefix="blue")
    assert make_celery(settings).conf.broker_transport_options["global_keyprefix"] == "blue:"


def test_sqlalchemy_broker_gets_no_redis_options(make_settings: Any) -> None:
    settings = make_settings(broker_url="sqla+sqlite:////tmp/x.sqlite3")
    assert make_celery(settings).conf.broker_transport_options == {}
