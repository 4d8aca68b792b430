"""The services a process depends on (database, broker, storage, Redis), checked quickly.

`ingest doctor` reports every one; `ingest web`, `ingest worker` and `ingest beat` check them
at start and log one WARNING per unreachable one, then start anyway: each recovers on its own
when the service comes back (the pools reconnect, Celery retries its broker), and refusing to
start would turn a database restart into a crash loop of every process.

Every check runs in its own daemon thread with a short timeout, all at once, and the wait for
them is bounded: a service that answers nothing (a paused server, a dropped packet) costs
start-up about ``timeout`` seconds, and a check still hanging then cannot keep the process
from exiting.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click

from ingest import logs
from ingest.settings import Settings, hide_password

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

# Per check: the network timeout each client gets, and about how long a dead service delays
# the start of a process.
CHECK_SECONDS = 2.0
# On top of the timeout, for the work a check does before it touches the network (building a
# Celery app or an S3 client) on a busy machine.
_SETUP_SLACK_SECONDS = 1.5

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dependency:
    name: str
    # What it points at, fit for a log line (no password).
    target: str
    # Returns a short detail when the service answers as expected, raises otherwise.
    check: Callable[[Settings, float], str]


@dataclass(frozen=True)
class CheckResult:
    name: str
    target: str
    ok: bool
    # The check's detail when ok, the cause in one line otherwise.
    detail: str


def describe(exc: BaseException) -> str:
    """The cause of a failure in one short line (drivers often say it in several)."""
    from sqlalchemy.exc import DBAPIError

    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    # libpq: 'connection failed: connection to server at "h", port 1 failed: Connection refused'
    if "connection to server" in line and " failed: " in line:
        line = line.rsplit(" failed: ", 1)[1]
    line = re.sub(r"^(FATAL|ERROR):\s+", "", line)
    if len(line) > 1 and line[0].isupper() and line[1].islower():
        line = line[0].lower() + line[1:]
    return line.rstrip(".")


# --- the checks ------------------------------------------------------------------------


def check_database(settings: Settings, timeout: float) -> str:
    """The database answers and its schema is the one this code expects."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from ingest.migrate import alembic_config

    url = settings.database_url
    engine = _engine(url, timeout)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    if current != head:
        raise RuntimeError(f"schema at {current}, code expects {head}: run `ingest db upgrade`")
    return f"schema at {head}"


def _engine(url: str, timeout: float, *, ours: bool = True) -> Engine:
    """An engine that gives up connecting after about ``timeout``; ``ours=False`` for a
    database that is not the service's (the broker's): a plain engine, none of our SQLite
    pragmas (WAL would stay on the broker's file)."""
    from sqlalchemy import create_engine

    from ingest.db import make_engine

    build = make_engine if ours else create_engine
    if url.startswith("sqlite"):
        return build(url)
    # libpq counts whole seconds and treats anything under 2 as 2.
    return build(url, connect_args={"connect_timeout": max(2, round(timeout))})


def check_broker(settings: Settings, timeout: float) -> str:
    if settings.broker_url.startswith("sqla+"):
        # kombu's SQL transport connects lazily, on the first message: ask the database.
        from sqlalchemy import text

        engine = _engine(settings.broker_url.removeprefix("sqla+"), timeout, ours=False)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
        return "connected"
    from tasks.celery_app import make_celery

    app = make_celery(settings)
    app.conf.broker_connection_timeout = timeout
    with app.connection_for_write() as connection:
        # One attempt: kombu's default retry loop would sleep seconds before saying anything.
        connection.ensure_connection(max_retries=0)
    return "connected"


def check_storage(settings: Settings, timeout: float) -> str:
    from ingest.storage import storage_from_settings

    parts = urlsplit(settings.storage_url)
    if parts.scheme != "s3":
        storage_from_settings(settings).check()
        return "writable"
    # The service's own client retries five times with 5 s connects: right for an upload,
    # far too patient for a look at start-up. Same endpoint and addressing, one try.
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    endpoint = settings.s3_endpoint_url
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "max_attempts": 1},
        signature_version="s3v4",
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    try:
        client.head_bucket(Bucket=parts.netloc)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        meaning = _S3_ANSWERS.get(code, "refused")
        raise RuntimeError(f"bucket {parts.netloc!r} {meaning} (HeadBucket: {code})") from exc
    return "reachable"


_S3_ANSWERS = {
    "404": "does not exist",
    "NoSuchBucket": "does not exist",
    "403": "is not ours to use: access denied",
    "AccessDenied": "is not ours to use: access denied",
}


def check_redis(settings: Settings, timeout: float) -> str:
    if not settings.redis_url:
        return "not configured: rate limits are per process, the error budget lives in SQL"
    from redis import Redis

    client = Redis.from_url(
        settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        client.ping()
    finally:
        client.close()
    return "connected"


def dependencies(settings: Settings) -> list[Dependency]:
    storage = settings.storage_url
    if settings.s3_endpoint_url and storage.startswith("s3:"):
        storage += f" at {settings.s3_endpoint_url}"
    return [
        Dependency("database", hide_password(settings.database_url), check_database),
        Dependency("broker", hide_password(settings.broker_url), check_broker),
        Dependency("storage", hide_password(storage), check_storage),
        Dependency("redis", hide_password(settings.redis_url or "-"), check_redis),
    ]


def _import_what_checks_use(settings: Settings) -> None:
    """Import here, in one thread: modules first imported by several threads at once can be
    seen half-initialised (SQLAlchemy's circular imports fail that way)."""
    import importlib

    modules = [
        "sqlalchemy",
        "sqlalchemy.engine",
        "alembic.runtime.migration",
        "alembic.script",
        "ingest.db",
        "ingest.migrate",
        "ingest.storage",
        "redis",
        "tasks.celery_app",
    ]
    if settings.storage_url.startswith("s3:"):
        modules += ["boto3", "botocore.config", "botocore.exceptions"]
    for module in modules:
        importlib.import_module(module)


def check_dependencies(
    settings: Settings, *, timeout: float = CHECK_SECONDS, only: tuple[str, ...] | None = None
) -> list[CheckResult]:
    """Run every check at once; one still running after about ``timeout`` is a failure."""
    chosen = [dep for dep in dependencies(settings) if only is None or dep.name in only]
    _import_what_checks_use(settings)
    results: dict[str, CheckResult] = {}

    def run(dep: Dependency) -> None:
        try:
            detail = dep.check(settings, timeout)
        except Exception as exc:  # noqa: BLE001 - a check reports any failure, it never raises
            results[dep.name] = CheckResult(dep.name, dep.target, False, describe(exc))
        else:
            results[dep.name] = CheckResult(dep.name, dep.target, True, detail)

    threads = [
        threading.Thread(target=run, args=(dep,), name=f"check-{dep.name}", daemon=True)
        for dep in chosen
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + _SETUP_SLACK_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [
        results.get(dep.name)
        or CheckResult(dep.name, dep.target, False, f"no answer within {timeout:g} s")
        for dep in chosen
    ]


def warn_unreachable(
    settings: Settings, process: str, *, timeout: float = CHECK_SECONDS
) -> list[CheckResult]:
    """Log one WARNING per dependency that does not answer; the process starts anyway."""
    failed = [
        outcome for outcome in check_dependencies(settings, timeout=timeout) if not outcome.ok
    ]
    if not failed:
        return failed
    # The process commands configure logging first (cli.service.configure_logging); a caller
    # that did not still gets the service's text line on stderr, not logging's bare fallback.
    handler = None
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logs.formatter("text"))
        LOG.addHandler(handler)
        LOG.propagate = False
    try:
        for outcome in failed:
            LOG.warning(
                "%s: %s unavailable (%s): %s; starting anyway, it is used once it answers",
                process,
                outcome.name,
                outcome.target,
                outcome.detail,
            )
    finally:
        if handler is not None:
            LOG.removeHandler(handler)
            LOG.propagate = True
    return failed


# --- ports a process is about to listen on -------------------------------------------------


def port_problem(host: str, port: int) -> str | None:
    """Why ``port`` cannot be listened on at ``host`` now, or ``None`` when it can.

    Binds the way gunicorn does (``SO_REUSEADDR``), so a port whose last connections are
    only in TIME_WAIT counts as free, as it is to gunicorn.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use"
            return f"cannot be used: {exc.strerror or type(exc).__name__}"
    return None


def _free_port_after(host: str, port: int, taken: set[int]) -> int | None:
    for candidate in range(port + 1, min(port + 100, 65536)):
        if candidate not in taken and port_problem(host, candidate) is None:
            return candidate
    return None


@click.command("ports-free", hidden=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--then", "command", default="", help="the command to suggest with another port")
@click.argument("ports", nargs=-1, required=True, metavar="VARIABLE=PORT...")
def ports_free(host: str, command: str, ports: tuple[str, ...]) -> None:
    """Exit 1, one line per port, if any port is taken (`make run` asks before it starts)."""
    wanted: list[tuple[str, int]] = []
    for item in ports:
        variable, _, value = item.partition("=")
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise click.BadParameter(f"{item!r}: expected VARIABLE=PORT", param_hint="PORTS")
        wanted.append((variable, int(value)))
    taken = {port for _, port in wanted}
    problems = []
    for variable, port in wanted:
        problem = port_problem(host, port)
        if problem is None:
            continue
        other = _free_port_after(host, port, taken)
        suggestion = f"{variable}={other if other else '...'}" + (f" {command}" if command else "")
        problems.append(
            f"port {port} on {host} {problem}: set {variable} to a free port ({suggestion})"
        )
    for line in problems:
        click.echo(f"ingest: {line}", err=True)
    if problems:
        raise SystemExit(1)


def warn_unsigned_instances(settings: Settings) -> None:
    """One WARNING per instance that accepts unsigned webhooks: the operator allowed it
    (`--allow-unsigned-webhooks`), and it should stay visible in every web start-up log."""
    from ingest import accounts
    from ingest.db import DATABASE_DOWN, make_engine, make_session_factory

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            names = accounts.unsigned_instances(session)
    except DATABASE_DOWN:
        return  # already reported by warn_unreachable
    finally:
        engine.dispose()
    for name in names:
        LOG.warning(
            "instance %s ACCEPTS UNSIGNED WEBHOOKS: anyone who reaches this service can make "
            "it download with that instance's provider key (`ingest instance update %s "
            "--app-secret` or a webhook secret ends it)",
            name,
            name,
        )
