"""``ingest doctor``: check every configured service and say which one is wrong."""

from __future__ import annotations

import sys

import click

from cli.dependencies import check_dependencies
from ingest.settings import load_settings

# Longer than at start-up: a person is waiting for an answer, not for a process to start.
DOCTOR_TIMEOUT_SECONDS = 5.0


@click.command()
def doctor() -> None:
    """Check the database, broker, object store and Redis this configuration names."""
    settings = load_settings()
    settings.ensure_var_dir()
    failed = False
    for outcome in check_dependencies(settings, timeout=DOCTOR_TIMEOUT_SECONDS):
        failed = failed or not outcome.ok
        status = "ok  " if outcome.ok else "FAIL"
        click.echo(f"{status}  {outcome.name:<9} {outcome.target}  ({outcome.detail})")
    click.echo(f"media hosts allowed: {', '.join(settings.media_hosts)}")
    sys.exit(1 if failed else 0)


COMMANDS = (doctor,)
