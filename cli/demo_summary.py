"""``ingest demo``'s summary: what was sent, stored, verified and lost, how fast, and what became
of the demo's own instance; printed as lines or one JSON object.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cli.demo_verify import Sent
from ingest import accounts
from ingest.models import MediaState, Provider

MB = 1024 * 1024


@dataclass
class Cleanup:
    """What became of the demo's instance once it ended."""

    kept: bool = False
    removed: accounts.RemovedInstance | None = None
    error: str | None = None


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile (inclusive method), or None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarise(
    sent: list[Sent], provider: Provider, service_url: str, embedded: bool
) -> dict[str, Any]:
    stored = [s for s in sent if s.state == MediaState.STORED and s.stored_at is not None]
    latencies = sorted(
        (s.stored_at - s.sent_at).total_seconds() for s in stored if s.stored_at is not None
    )
    failed = Counter(s.reason or s.state for s in sent if s.state != MediaState.STORED)
    corrupted = [s for s in stored if s.verified is False]
    span = (
        (
            max(s.stored_at for s in stored if s.stored_at) - min(s.sent_at for s in sent)
        ).total_seconds()
        if stored
        else 0.0
    )
    by_type = Counter(s.media.media_type for s in sent)
    return {
        "provider": str(provider),
        "service": service_url,
        "embedded_service": embedded,
        "sent": len(sent),
        "accepted": sum(1 for s in sent if s.status == 200),
        "stored": len(stored),
        "verified": sum(1 for s in stored if s.verified),
        "corrupted": len(corrupted),
        "lost": len(sent) - len(stored),
        "failed_by_reason": dict(sorted(failed.items())),
        "problems": sorted({s.problem for s in corrupted if s.problem}),
        "by_type": dict(sorted(by_type.items())),
        "bytes": sum(s.media.file_size for s in sent),
        "throughput_items_per_second": round(len(stored) / span, 2) if span > 0 else None,
        "seconds_to_stored": {
            name: None if value is None else round(value, 3)
            for name, value in (
                ("p50", percentile(latencies, 50)),
                ("p95", percentile(latencies, 95)),
                ("p99", percentile(latencies, 99)),
                ("max", latencies[-1] if latencies else None),
            )
        },
    }


def cleanup_summary(cleanup: Cleanup, instance: str, var_dir: Path | None) -> dict[str, Any]:
    """The summary's account of the demo's own rows: removed, kept (and how to look), failed."""
    result: dict[str, Any] = {"instance": instance, "kept": cleanup.kept}
    if cleanup.removed is not None:
        result["removed"] = {
            "media_rows": cleanup.removed.media_rows,
            "objects": cleanup.removed.objects,
            "tokens": cleanup.removed.tokens,
        }
    if cleanup.error is not None:
        result["error"] = cleanup.error
    if cleanup.kept:
        env = f"INGEST_VAR_DIR={var_dir} " if var_dir is not None else ""
        result["look"] = (
            f"{env}ingest media list --instance {instance}; "
            f"{env}ingest token list --instance {instance}"
        )
    return result


def cleanup_line(cleanup: dict[str, Any]) -> str:
    if cleanup["kept"]:
        return f"kept        instance {cleanup['instance']}, its token and media: {cleanup['look']}"
    if "removed" in cleanup:
        removed = cleanup["removed"]
        return (
            f"cleanup     instance {cleanup['instance']} and its token removed, with "
            f"{removed['media_rows']} media rows and {removed['objects']} stored objects, the "
            "probe's included (--keep keeps them)"
        )
    return f"cleanup     FAILED for instance {cleanup['instance']}: {cleanup.get('error')}"


def print_summary(summary: dict[str, Any]) -> None:
    lat = summary["seconds_to_stored"]
    where = "embedded service (started by the demo)" if summary["embedded_service"] else ""
    click.echo(f"service     {summary['service']} {where}".rstrip())
    if summary.get("sandbox"):
        click.echo(f"sandbox     {summary['sandbox']}")
    click.echo(f"provider    {summary['provider']}")
    if summary.get("token_rate_limit"):
        click.echo(
            f"token       own rate limit {summary['token_rate_limit']} (as `ingest token create "
            "--rate-limit` sets); INGEST_API_RATE_LIMIT unchanged for every other token"
        )
    click.echo(
        f"sent        {summary['sent']} ({summary['bytes'] / MB:.1f} MB: "
        + ", ".join(f"{k} {v}" for k, v in summary["by_type"].items())
        + ")"
    )
    click.echo(f"accepted    {summary['accepted']}")
    click.echo(f"stored      {summary['stored']} (verified byte for byte: {summary['verified']})")
    failed = summary["failed_by_reason"]
    click.echo(
        "failed      " + (", ".join(f"{k}: {v}" for k, v in failed.items()) if failed else "0")
    )
    click.echo(f"corrupted   {summary['corrupted']}")
    rate = summary["throughput_items_per_second"]
    click.echo(f"throughput  {rate if rate is not None else '-'} items/s")
    click.echo(
        "to stored   "
        + "  ".join(f"{k} {'-' if v is None else f'{v:.2f} s'}" for k, v in lat.items())
    )
    if summary.get("seconds_to_verified") is not None:
        click.echo(
            f"to verified {summary['seconds_to_verified']:.1f} s for all, from the first webhook"
            + (
                f" ({summary['api_throttled']} archive API answers were 429: the token's limit)"
                if summary.get("api_throttled")
                else ""
            )
        )
    if summary.get("cleanup"):
        click.echo(cleanup_line(summary["cleanup"]))
    verdict = "OK: nothing lost or corrupted" if demo_ok(summary) else "FAILED: see above"
    click.echo(verdict)


def demo_ok(summary: dict[str, Any]) -> bool:
    return bool(
        summary["sent"] > 0
        and summary["lost"] == 0
        and summary["corrupted"] == 0
        and summary["verified"] == summary["sent"]
    )
