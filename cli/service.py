"""Process commands: web, worker, beat, and database migrations."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from cli.dependencies import warn_unreachable, warn_unsigned_instances
from ingest import logs, migrate
from ingest.queues import ALL_QUEUES
from ingest.settings import Settings, load_settings

# gunicorn's access line: client, request, status, bytes, milliseconds. The path goes
# without its query string: the handshake's query carries the verify token, and secrets never
# reach a log line. Every field is escaped (cli.web_hardening.EscapingLogger).
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger's one handler, in the configured format. Worker and beat call it
    before Celery starts: Celery leaves a configured root logger alone
    (``worker_hijack_root_logger=False``)."""
    logs.configure(level, log_format)


def gunicorn_log_config(level: str, log_format: str) -> dict[str, Any] | None:
    """gunicorn's ``logconfig_dict``: with json, its error log and the root logger write JSON
    lines; the access log keeps its own (escaped) line. None with text: gunicorn's default."""
    if log_format != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": "ingest.logs.JsonFormatter"},
            "access": {"format": "%(message)s"},  # gunicorn's own access formatter
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            },
            "access_console": {
                "class": "logging.StreamHandler",
                "formatter": "access",
                "stream": "ext://sys.stdout",
            },
        },
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["console"], "propagate": False},
            "gunicorn.access": {
                "level": "INFO",
                "handlers": ["access_console"],
                "propagate": False,
            },
        },
    }


def _metrics_dir(var_dir: Path) -> Path:
    return Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or var_dir.resolve() / "metrics")


def _configure_multiprocess_metrics(var_dir: Path) -> None:
    """Must run before prometheus_client is imported: it reads the variable at import."""
    directory = _metrics_dir(var_dir)
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
    configure_logging(settings.log_level, settings.log_format)
    settings.ensure_var_dir()
    _configure_multiprocess_metrics(settings.var_dir)
    warn_unreachable(settings, "web")
    warn_unsigned_instances(settings)

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{host}:{port}",
                "workers": workers or settings.web_workers,
                "threads": settings.web_threads,
                "accesslog": "-",
                "access_log_format": ACCESS_LOG_FORMAT,
                # Client-controlled text (the decoded path above all) is escaped, so a
                # request cannot forge a log line or write a terminal escape.
                "logger_class": "cli.web_hardening.EscapingLogger",
                "loglevel": settings.log_level.lower(),
                "timeout": 60,
                "graceful_timeout": 20,
                "worker_tmp_dir": "/dev/shm",  # noqa: S108 - gunicorn heartbeat files, RAM-backed
                "child_exit": _mark_metrics_dead,
                # gunicorn 25+ opens a management socket (gunicornc) by default, at one path
                # per user ($HOME/.gunicorn/gunicorn.ctl) that every `ingest web` of that user
                # would share. Nothing here uses it: one interface less to protect.
                "control_socket_disable": True,
            }
            log_config = gunicorn_log_config(settings.log_level, settings.log_format)
            if log_config is not None:
                options["logconfig_dict"] = log_config
            if settings.web_threads > 1:
                # gunicorn's threaded worker, with a time limit on reading each request's
                # headers and body (cli/web_hardening.py). One thread means the sync worker,
                # whose worker timeout ends a slow request with the process; it is meant for
                # use behind a buffering proxy only.
                from cli.web_hardening import DeadlineThreadWorker

                # Set before gunicorn forks: every worker process inherits it.
                DeadlineThreadWorker.read_timeout_seconds = settings.web_read_timeout_seconds
                options["worker_class"] = "cli.web_hardening.DeadlineThreadWorker"
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from webhook.app import create_app

            return create_app(settings)

    _Gunicorn().run()


@click.command()
@click.option("--queues", default=",".join(ALL_QUEUES), show_default=True)
@click.option(
    "--concurrency", type=int, help="threads in all, over every process [INGEST_WORKER_CONCURRENCY]"
)
@click.option("--pool", help="Celery pool [INGEST_WORKER_POOL]")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    help="Celery worker processes sharing the concurrency [CPU count]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="serve /metrics of this worker's processes on this port (off by default)",
)
@click.option(
    "--metrics-host",
    default="0.0.0.0",  # noqa: S104 - opt-in (--metrics-port): scraped from other machines
    show_default=True,
    help="address for --metrics-port",
)
def worker(
    queues: str,
    concurrency: int | None,
    pool: str | None,
    processes: int | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run Celery download workers (I/O pool, high concurrency).

    One worker process is bound by its GIL to one core, so by default one runs per CPU, each
    with its share of the threads: the total concurrency stays what was asked for.
    """
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    settings.ensure_var_dir()
    # Before anything imports prometheus_client (serving --metrics-port does): a process that
    # imported it without the variable keeps its values in memory, where no scrape sees them.
    _configure_multiprocess_metrics(settings.var_dir)
    if _NODE_NAME not in os.environ:
        # Once per `ingest worker`: its child processes (they have a node name) skip it.
        warn_unreachable(settings, "worker")
        if metrics_port is not None:
            _serve_metrics(metrics_host, metrics_port, _metrics_dir(settings.var_dir))
    total = concurrency or settings.worker_concurrency
    count = min(processes or os.cpu_count() or 1, total)
    if count > 1:
        _declare_queues_of_database_broker(settings)
        assert settings.worker_heartbeat_file is not None
        metrics_dir = _metrics_dir(settings.var_dir)
        sys.exit(
            _run_worker_processes(
                count, total, queues, pool, settings.worker_heartbeat_file, metrics_dir
            )
        )
    if _NODE_NAME in os.environ:
        _end_with_parent()
    # The runtime sizes its SQL pool and row slots from the settings: make them agree with
    # the flags.
    os.environ["INGEST_WORKER_CONCURRENCY"] = str(total)
    if pool:
        os.environ["INGEST_WORKER_POOL"] = pool
    from tasks.worker import app

    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--pool={pool or settings.worker_pool}",
            f"--concurrency={total}",
            f"--queues={queues}",
            "--without-gossip",
            "--without-mingle",
            *([f"--hostname={os.environ[_NODE_NAME]}"] if _NODE_NAME in os.environ else []),
        ]
    )


_NODE_NAME = "INGEST_WORKER_NODE_NAME"
_ENTRY = "from cli.main import main; main()"


def _serve_metrics(host: str, port: int, directory: Path) -> None:
    """Every process of this worker, merged, on ``host:port`` (a daemon thread): a machine
    that runs workers and no web process is scraped here. The processes write their values
    under ``directory`` (each sets PROMETHEUS_MULTIPROC_DIR to it as it starts)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    start_http_server(port, addr=host, registry=registry)


def _end_with_parent() -> None:
    """A child worker gets SIGTERM when its parent dies, even by SIGKILL (Linux only):
    an orphan would keep consuming tasks that nobody supervises."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _declare_queues_of_database_broker(settings: Settings) -> None:
    """Create the queues of kombu's SQLAlchemy broker once, before the children start.

    That transport creates a queue's row on first use with a SELECT and then an INSERT: child
    workers starting together on a fresh broker database race, and the loser stops at start
    with a UNIQUE violation. Brokers with a server declare atomically and are left alone.
    """
    if not settings.broker_url.startswith("sqla+"):
        return
    from tasks.celery_app import make_celery

    app = make_celery(settings)
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in app.amqp.queues.values():
                queue.bind(channel).declare()
    except Exception as exc:  # noqa: BLE001 - the children retry the broker themselves
        logging.getLogger(__name__).warning(
            "worker: could not declare the broker's queues first (%s); starting anyway",
            type(exc).__name__,
        )


def thread_shares(total: int, count: int) -> list[int]:
    """``total`` threads over ``count`` worker processes, as evenly as they go."""
    return [total // count + (1 if n < total % count else 0) for n in range(count)]


def _run_worker_processes(
    count: int, total: int, queues: str, pool: str | None, heartbeat: Path, metrics_dir: Path
) -> int:
    """Start ``count`` single-process workers and stay until they end.

    A signal is passed on to every child; when one child ends the others are stopped too,
    so a supervisor sees the failure and restarts the whole worker. Each child keeps a
    heartbeat file of its own; the parent touches ``heartbeat`` only while every child's is
    fresh, so `ingest worker-alive` fails when any one consumer has died.
    """
    from tasks.heartbeat import STALE_TICKS_SECONDS, heartbeat_age, touch

    children: list[subprocess.Popen[bytes]] = []
    child_heartbeats: list[Path] = []
    for n, share in enumerate(thread_shares(total, count)):
        argv = [sys.executable, "-c", _ENTRY, "worker", "--processes", "1"]
        argv += ["--concurrency", str(share), "--queues", queues]
        if pool:
            argv += ["--pool", pool]
        child_heartbeat = heartbeat.with_name(f"{heartbeat.name}.{n + 1}")
        child_heartbeat.unlink(missing_ok=True)
        child_heartbeats.append(child_heartbeat)
        env = {
            **os.environ,
            # Set before the child's interpreter starts, so prometheus_client writes to it.
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            _NODE_NAME: f"worker{n + 1}@{socket.gethostname()}",
            "INGEST_WORKER_HEARTBEAT_FILE": str(child_heartbeat),
        }
        children.append(subprocess.Popen(argv, env=env))  # noqa: S603 - our own command

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {
        signum: signal.signal(signum, forward)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
    }
    code = 0
    try:
        while children:
            for child in list(children):
                status = child.poll()
                if status is None:
                    continue
                children.remove(child)
                if status != 0 and code == 0:
                    code = status if status > 0 else 1
                    forward(signal.SIGTERM, None)
            ages = [heartbeat_age(path) for path in child_heartbeats]
            if all(age is not None and age < STALE_TICKS_SECONDS for age in ages):
                touch(heartbeat)
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


@click.command("worker-alive")
@click.option(
    "--max-age",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="seconds since the last heartbeat",
)
def worker_alive(max_age: float) -> None:
    """Exit 0 if this machine's worker consumed recently enough (its heartbeat file is
    younger than --max-age), 1 otherwise: a liveness probe [INGEST_WORKER_HEARTBEAT_FILE]."""
    from tasks.heartbeat import heartbeat_age

    settings = load_settings()
    assert settings.worker_heartbeat_file is not None
    age = heartbeat_age(settings.worker_heartbeat_file)
    if age is None:
        click.echo(f"worker: no heartbeat at {settings.worker_heartbeat_file}", err=True)
        sys.exit(1)
    if age > max_age:
        click.echo(f"worker: last heartbeat {age:.0f} s ago (limit {max_age:.0f} s)", err=True)
        sys.exit(1)
    click.echo(f"worker: alive (heartbeat {age:.1f} s ago)")


@click.command()
def beat() -> None:
    """Run the beat scheduler (exactly one per deployment): the reconciler, every minute."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    settings.ensure_var_dir()
    warn_unreachable(settings, "beat")
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


COMMANDS = (web, worker, worker_alive, beat, db)
