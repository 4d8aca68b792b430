"""``ingest doctor``: check every configured service and say which one is wrong."""

from __future__ import annotations

import sys
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import click

from ingest.settings import Settings, load_settings


def _redact(url: str) -> str:
    """Drop the password from a URL before it is printed."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _check_database(settings: Settings) -> str:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from ingest.db import make_engine
    from ingest.migrate import alembic_config

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_current_head()
    if current != head:
        raise RuntimeError(f"schema at {current}, code expects {head}: run `ingest db upgrade`")
    return f"schema at {head}"


def _check_broker(settings: Settings) -> str:
    from tasks.dispatch import CeleryScheduler

    CeleryScheduler.from_settings(settings).ping()
    return "connected"


def _check_storage(settings: Settings) -> str:
    from ingest.storage import storage_from_settings

    storage_from_settings(settings).check()
    return "reachable"


def _check_redis(settings: Settings) -> str:
    if not settings.redis_url:
        return "not configured: rate limits are per process, the error budget lives in SQL"
    from redis import Redis

    Redis.from_url(settings.redis_url, socket_connect_timeout=2).ping()
    return "connected"


@click.command()
def doctor() -> None:
    """Check the database, broker, object store and Redis this configuration names."""
    settings = load_settings()
    settings.ensure_var_dir()
    checks: list[tuple[str, str, Callable[[Settings], str]]] = [
        ("database", _redact(settings.database_url), _check_database),
        ("broker", _redact(settings.broker_url), _check_broker),
        ("storage", settings.storage_url, _check_storage),
        ("redis", _redact(settings.redis_url or "-"), _check_redis),
    ]
    failed = False
    for name, target, check in checks:
        try:
            detail = check(settings)
            click.echo(f"ok    {name:<9} {target}  ({detail})")
        except Exception as exc:  # noqa: BLE001 - a diagnosis reports every failure
            failed = True
            click.echo(f"FAIL  {name:<9} {target}  ({type(exc).__name__}: {exc})")
    click.echo(f"media hosts allowed: {', '.join(settings.media_hosts)}")
    sys.exit(1 if failed else 0)


COMMANDS = (doctor,)
