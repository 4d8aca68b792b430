"""``ingest``: run the service and manage its registry."""

from __future__ import annotations

import sys

import click

from cli import doctor, registry, service
from ingest.settings import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """WhatsApp media ingestion: webhook receiver, download workers and archive API.

    Configuration comes from INGEST_* environment variables (see README).
    """


for command in (*service.COMMANDS, *registry.COMMANDS, *doctor.COMMANDS):
    cli.add_command(command)


def main() -> None:
    try:
        cli.main(prog_name="ingest", standalone_mode=True)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
