"""``ingest``: run the service and manage its registry."""

from __future__ import annotations

import sys

import click

from cli import demo, doctor, registry, service
from cli import sandbox as sandbox_cli
from ingest.settings import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """WhatsApp media ingestion: webhook receiver, download workers and archive API.

    Configuration comes from INGEST_* environment variables (see README).
    """


for command in (*service.COMMANDS, *registry.COMMANDS, *doctor.COMMANDS, *demo.COMMANDS):
    cli.add_command(command)
cli.add_command(sandbox_cli.sandbox)


def main() -> None:
    try:
        cli.main(prog_name="ingest", standalone_mode=True)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
