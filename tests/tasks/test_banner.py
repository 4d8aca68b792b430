from typing import Any

from tasks.celery_app import make_celery


def test_the_worker_banner_tells_the_truth(make_settings: Any) -> None:
    """Celery prints as_uri() and the queue table at start: no phantom password, the
    scheme as configured, each queue with its own exchange and routing key."""
    plain = make_celery(make_settings(broker_url="redis://127.0.0.1:6379/0"))
    assert plain.connection().as_uri() == "redis://127.0.0.1:6379/0"
    secret = make_celery(make_settings(broker_url="redis://:hunter2@127.0.0.1:6379/0"))
    assert secret.connection().as_uri() == "redis://:**@127.0.0.1:6379/0"
    assert secret.connection().as_uri(include_password=True).endswith(":hunter2@127.0.0.1:6379/0")
    assert [line.split() for line in plain.amqp.queues.format().splitlines()] == [
        [".>", name, f"exchange={name}(direct)", f"key={name}"]
        for name in ("maintenance", "media.large", "media.small")
    ]
