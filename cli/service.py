"""Process commands: web, worker, beat, and database migrations."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click

from ingest import migrate
from ingest.queues import ALL_QUEUES
from ingest.settings import load_settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


def _configure_multiprocess_metrics(var_dir: Path) -> None:
    """Must run before prometheus_client is imported: it reads the variable at import."""
    directory = var_dir.resolve() / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(directory))


def _mark_metrics_dead(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", type=int, help="gunicorn worker processes [INGEST_WEB_WORKERS]")
def web(host: str, port: int, workers: int | None) -> None:
    """Serve the webhook receiver and archive API with gunicorn."""
    from gunicorn.app.base import BaseApplication

    settings = load_settings()
    configure_logging(settings.log_level)
    settings.ensure_var_dir()
    _configure_multiprocess_metrics(settings.var_dir)

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{host}:{port}",
                "workers": workers or settings.web_workers,
                "threads": settings.web_threads,
                "accesslog": "-",
                "loglevel": settings.log_level.lower(),
                "timeout": 60,
                "graceful_timeout": 20,
                "worker_tmp_dir": "/dev/shm",  # noqa: S108 - gunicorn heartbeat files, RAM-backed
                "child_exit": _mark_metrics_dead,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from webhook.app import create_app

            return create_app(settings)

    _Gunicorn().run()


@click.command()
@click.option("--queues", default=",".join(ALL_QUEUES), show_default=True)
@click.option("--concurrency", type=int, help="threads per worker [INGEST_WORKER_CONCURRENCY]")
@click.option("--pool", help="Celery pool [INGEST_WORKER_POOL]")
def worker(queues: str, concurrency: int | None, pool: str | None) -> None:
    """Run a Celery download worker (I/O pool, high concurrency)."""
    settings = load_settings()
    settings.ensure_var_dir()
    _configure_multiprocess_metrics(settings.var_dir)
    from tasks.worker import app

    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--pool={pool or settings.worker_pool}",
            f"--concurrency={concurrency or settings.worker_concurrency}",
            f"--queues={queues}",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@click.command()
def beat() -> None:
    """Run the beat scheduler (exactly one per deployment): the reconciler, every minute."""
    settings = load_settings()
    settings.ensure_var_dir()
    from tasks.worker import app

    app.start(
        [
            "beat",
            f"--loglevel={settings.log_level}",
            f"--schedule={settings.var_dir.resolve() / 'celerybeat-schedule'}",
        ]
    )


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration (idempotent)."""
    settings = load_settings()
    settings.ensure_var_dir()
    migrate.upgrade(settings.database_url)
    click.echo("database is up to date")


@db.command("check")
def db_check() -> None:
    """Fail if the models and the migrations disagree."""
    migrate.check(load_settings().database_url)


COMMANDS = (web, worker, beat, db)
