"""``ingest``: run the service and manage its registry."""

from __future__ import annotations

from typing import Any

import click

from cli import demo, dependencies, doctor, operate, registry, service
from cli import sandbox as sandbox_cli
from ingest.settings import ConfigError, Settings, hide_password, load_settings

# Exit statuses: a bad configuration (the process must not be retried as it is) and a service
# this command needs that is down or refuses.
CONFIG_ERROR_STATUS = 2
UNAVAILABLE_STATUS = 1


class _IngestGroup(click.Group):
    """Turns the errors a user can cause or meet (a bad setting, a service down, a database
    that does not exist) into one line naming the service and the cause, in one place for
    every command. ``ingest --debug`` shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            line = None if ctx.params.get("debug") else one_line_error(exc)
            if line is None:
                raise
            message, status = line
            click.echo(f"ingest: {message}", err=True)
            ctx.exit(status)


@click.group(cls=_IngestGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--debug",
    "-v",
    is_flag=True,
    help="Show the traceback of an error instead of one line naming its cause.",
)
def cli(debug: bool) -> None:
    """WhatsApp media ingestion: webhook receiver, download workers and archive API.

    Configuration comes from INGEST_* environment variables (see README).
    """


for command in (
    *service.COMMANDS,
    *registry.COMMANDS,
    *doctor.COMMANDS,
    *demo.COMMANDS,
    *operate.COMMANDS,
):
    cli.add_command(command)
cli.add_command(sandbox_cli.sandbox)
cli.add_command(dependencies.ports_free)


def one_line_error(exc: Exception) -> tuple[str, int] | None:
    """``(message, exit status)`` for an error that is not a bug, ``None`` for one that is."""
    if isinstance(exc, ConfigError):
        return str(exc), CONFIG_ERROR_STATUS
    service_name = _failing_service(exc)
    if service_name is None:
        return None
    target = _target(service_name, exc)
    where = f" ({target})" if target else ""
    cause = dependencies.describe(exc)
    if getattr(exc, "statement", None) is not None:
        # Connected, and a statement failed: not an outage.
        hint = "; run `ingest db upgrade`" if _missing_table(exc, cause) else ""
        return f"{service_name} error{where}: {cause}{hint}", UNAVAILABLE_STATUS
    return f"{service_name} unavailable{where}: {cause}", UNAVAILABLE_STATUS


def _missing_table(exc: Exception, cause: str) -> bool:
    undefined_table = getattr(getattr(exc, "orig", None), "sqlstate", None) == "42P01"
    return undefined_table or cause.startswith("no such table")


def _failing_service(exc: Exception) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from ingest.storage import StorageError

    if isinstance(exc, DBAPIError | PoolTimeout):
        return "database"
    if isinstance(exc, BrokerError):
        return "broker"
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return "redis"
    if isinstance(exc, BotoCoreError | ClientError | StorageError):
        return "storage"
    return None


def _target(service_name: str, exc: Exception) -> str | None:
    """The URL of the failing service, password hidden, when the settings name it."""
    try:
        settings = load_settings()
    except ConfigError:
        return None
    if service_name == "redis":
        return _redis_target(settings, str(exc))
    url = {
        "database": settings.database_url,
        "broker": settings.broker_url,
        "storage": settings.storage_url,
    }[service_name]
    return hide_password(url)


def _redis_target(settings: Settings, message: str) -> str | None:
    """Redis serves two settings (shared counters, and the broker when it is redis://): the
    one whose host and port the error names, else the counters'."""
    from urllib.parse import urlsplit

    candidates = [
        url
        for url in (settings.redis_url, settings.broker_url)
        if url and urlsplit(url).scheme in ("redis", "rediss")
    ]
    for url in candidates:
        parts = urlsplit(url)
        if f"{parts.hostname}:{parts.port or 6379}" in message:
            return hide_password(url)
    return hide_password(candidates[0]) if candidates else None


def main() -> None:
    cli.main(prog_name="ingest", standalone_mode=True)
