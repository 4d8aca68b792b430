"""Entry point for ``celery -A tasks.worker`` (worker and beat)."""

from ingest.settings import load_settings
from tasks.celery_app import make_celery

app = make_celery(load_settings())
