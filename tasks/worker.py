"""Entry point for ``celery -A tasks.worker`` (worker and beat)."""

from ingest.settings import load_settings
from tasks.celery_app import make_celery
from tasks.heartbeat import ConsumerTicks

app = make_celery(load_settings())
app.steps["consumer"].add(ConsumerTicks)
