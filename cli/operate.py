"""Operating commands: how the backlog stands, and redriving failed or expired media."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from cli.registry import _session
from ingest import accounts, operations
from ingest.models import MediaState, utcnow

# Not from ingest.reconciler: the CLI must not import prometheus_client before `ingest web`
# and `ingest worker` point it at their multi-process directory (cli.service).
from ingest.retry_policy import FAILURE_REASONS

# Operator mistakes (a bad date, an unknown reason) exit 2, as a bad setting does.
USAGE_STATUS = 2


class Invalid(click.ClickException):
    """One line (``Error: ...``), exit status 2: no usage text around it."""

    exit_code = USAGE_STATUS


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    cells = [header, *[tuple(str(value) for value in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def stats_command(as_json: bool) -> None:
    """Media rows by instance, state and failure reason; the age of the oldest pending or
    downloading row; rows at risk: neither stored nor expired, with less than 24 h (and
    less than 1 h) left of their 7 days; and downstream callback events per instance by
    delivery state, with the age of the oldest still pending."""
    with _session() as session:
        result = operations.stats(session, utcnow())
    if as_json:
        document = {
            "now": result.now.isoformat(),
            "counts": [
                {
                    "instance": c.instance,
                    "state": c.state,
                    "reason": c.reason,
                    "count": c.count,
                }
                for c in result.counts
            ],
            "oldest_pending_seconds": result.oldest_pending_seconds,
            "at_risk": result.at_risk,
            "callbacks": [
                {
                    "instance": c.instance,
                    "pending": c.pending,
                    "delivered": c.delivered,
                    "failed": c.failed,
                    "oldest_pending_seconds": c.oldest_pending_seconds,
                }
                for c in result.callbacks
            ],
        }
        click.echo(json.dumps(document, sort_keys=True))
        return
    if result.counts:
        rows = [(c.instance, c.state, c.reason or "-", c.count) for c in result.counts]
        for line in _table(("instance", "state", "reason", "count"), rows):
            click.echo(line)
    else:
        click.echo("no media")
    click.echo("")
    click.echo(f"oldest pending: {_age(result.oldest_pending_seconds)}")
    click.echo(
        f"at risk: {result.at_risk['24h']} within 24h, {result.at_risk['1h']} within 1h "
        "of their 7 days"
    )
    if result.callbacks:
        click.echo("")
        deliveries = [
            (c.instance, c.pending, c.delivered, c.failed, _age(c.oldest_pending_seconds))
            for c in result.callbacks
        ]
        header = ("callbacks", "pending", "delivered", "failed", "oldest pending")
        for line in _table(header, deliveries):
            click.echo(line)


def _when(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{name} {value!r} is not an ISO 8601 date or time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


REDRIVE_HELP = f"""Put failed or expired media back to pending, due now.

Attempts, failure reason, last error and lease are cleared, and no wake-up is recorded,
so the reconciler publishes the rows on its next pass. Selected by instance, state
(default: both), failure reason (repeatable; one of {", ".join(FAILURE_REASONS)}) and
when they were received (--since inclusive, --until exclusive; ISO 8601, UTC unless an
offset is given).

Rows whose media id is past its 7 days are refused, counted and left unchanged: the
provider forgets the id after 7 days, every fresh URL comes from resolving it, and the
reconciler would expire the row again within one pass. Failure reasons exempt from this:
{", ".join(sorted(operations.REDRIVABLE_AFTER_EXPIRY)) or "none"} (not even
checksum_mismatch, which a fresh URL may fix only while the id lives).
"""


@click.command("redrive", help=REDRIVE_HELP)
@click.option("--instance", "instance_name", help="Only this instance's media.")
@click.option("--state", help="failed or expired (default: both).")
@click.option("--reason", "reasons", multiple=True, help="Only rows failed for this reason.")
@click.option("--since", help="Received at or after (ISO 8601).")
@click.option("--until", help="Received before (ISO 8601).")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
def redrive_command(
    instance_name: str | None,
    state: str | None,
    reasons: tuple[str, ...],
    since: str | None,
    until: str | None,
    dry_run: bool,
) -> None:
    allowed = [s.value for s in operations.REDRIVABLE_STATES]
    if state is not None and state not in allowed:
        raise Invalid(f"--state must be one of {', '.join(allowed)}, not {state!r}")
    unknown = [reason for reason in reasons if reason not in FAILURE_REASONS]
    if unknown:
        raise Invalid(f"unknown --reason {unknown[0]!r}: one of {', '.join(FAILURE_REASONS)}")
    if reasons and state == MediaState.EXPIRED:
        raise Invalid("--reason selects failed rows; expired rows have no failure reason")
    start, end = _when("--since", since), _when("--until", until)
    if start is not None and end is not None and start >= end:
        raise Invalid("--since must be before --until")
    selection = operations.Selection(
        instance=instance_name,
        states=(state,) if state else operations.Selection().states,
        reasons=reasons,
        since=start,
        until=end,
    )
    with _session() as session:
        try:
            report = operations.redrive(session, selection, utcnow(), dry_run)
        except accounts.RegistryError as exc:
            raise Invalid(str(exc)) from None
    _print_report(report)


def _print_report(report: operations.RedriveReport) -> None:
    if not report.matched:
        click.echo("no media matched")
        return
    verb = "would redrive" if report.dry_run else "redrive"
    groups = [
        (instance, state, reason or "-", verb, count)
        for (instance, state, reason), count in sorted(report.groups.items(), key=_group_order)
    ] + [
        (instance, state, reason or "-", "refused (past 7 days)", count)
        for (instance, state, reason), count in sorted(
            report.refused_groups.items(), key=_group_order
        )
    ]
    for line in _table(("instance", "state", "reason", "action", "count"), groups):
        click.echo(line)
    if report.sample:
        click.echo("")
        rows = [
            (
                row.id,
                row.instance,
                row.message_id,
                row.state,
                row.reason or "-",
                row.received_at.isoformat(),
            )
            for row in report.sample
        ]
        for line in _table(("id", "instance", "message id", "state", "reason", "received"), rows):
            click.echo(line)
    click.echo("")
    if report.dry_run:
        click.echo(
            f"dry run: {report.eligible} would be redriven, {report.refused} refused; "
            "nothing changed"
        )
    else:
        skipped = f", {report.skipped} changed meanwhile and left" if report.skipped else ""
        click.echo(f"redriven {report.redriven}, refused {report.refused}{skipped}")


def _group_order(item: tuple[operations.GroupKey, int]) -> tuple[str, str, str]:
    (instance, state, reason), _ = item
    return instance, state, reason or ""


COMMANDS = (stats_command, redrive_command)
