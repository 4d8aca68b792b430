"""Prometheus metrics. Labels are low-cardinality codes only: never a URL, token or id.

Multi-process: ``ingest web`` and ``ingest worker`` point PROMETHEUS_MULTIPROC_DIR at
``var/metrics`` (unless set) before anything imports prometheus_client (it reads the variable
at import), so ``/metrics`` on any web process reports every process on the machine.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from ingest.models import Provider

WEBHOOK_REQUESTS = Counter(
    "ingest_webhook_requests_total", "Webhook POSTs answered, by HTTP status.", ["status"]
)
WEBHOOK_MEDIA = Counter(
    "ingest_webhook_media_total", "Media messages received, new or repeated.", ["result"]
)
DOWNLOADS = Counter(
    "ingest_downloads_total",
    "Download attempts by outcome (stored, retry, failed, expired, skipped).",
    ["outcome", "reason"],
)
DOWNLOAD_SECONDS = Histogram(
    "ingest_download_seconds",
    "Duration of one download attempt.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
DOWNLOAD_BYTES = Counter("ingest_download_bytes_total", "Bytes archived.")
EARLIER_COPIES_FOUND = Counter(
    "ingest_earlier_copies_found_total",
    "Copies an earlier attempt uploaded but did not record (its worker died in between), "
    "found in storage by the next attempt, which records them instead of downloading again.",
)
PROVIDER_ERRORS = Counter(
    "ingest_provider_errors_total",
    "Provider error responses, by provider, endpoint and status class.",
    ["provider", "endpoint", "status"],
)
BUDGET_BLOCKED = Counter(
    "ingest_error_budget_blocked_total",
    "Provider calls not made because the number's error budget was spent, by provider and "
    "budget (media: every media GET of a number; lookup: 360dialog's media-id lookups).",
    ["provider", "budget"],
)
INSTANCE_DISCONNECTS = Counter(
    "ingest_instance_disconnects_total",
    "Instances marked disconnected by a worker, by provider and reason code (an outcome).",
    ["provider", "reason"],
)
DEPENDENCY_UP = Gauge(
    "ingest_dependency_up",
    "1 if the dependency answered the last readiness check of a live process, else 0.",
    ["dependency"],
    multiprocess_mode="livemostrecent",
)
# Backlog gauges: measured by the reconciler at each pass (one grouped query, not one per
# scrape) in whichever process ran it; "mostrecent" shows that pass's figures.
MEDIA_ITEMS = Gauge(
    "ingest_media_items",
    "Media rows by state and failure reason, at the last reconciler pass.",
    ["state", "reason"],
    multiprocess_mode="mostrecent",
)
MEDIA_AT_RISK = Gauge(
    "ingest_media_at_risk",
    "Rows not yet stored whose media id expires within the window (24h, 1h).",
    ["within"],
    multiprocess_mode="mostrecent",
)
OLDEST_PENDING_SECONDS = Gauge(
    "ingest_oldest_pending_seconds",
    "Age of the oldest row still pending or downloading, at the last reconciler pass.",
    multiprocess_mode="mostrecent",
)
QUEUE_DEPTH = Gauge(
    "ingest_queue_depth",
    "Wake-ups waiting in each broker queue, at the last reconciler pass.",
    ["queue"],
    multiprocess_mode="mostrecent",
)
RECEIPT_TO_STORED_SECONDS = Histogram(
    "ingest_receipt_to_stored_seconds",
    "From the webhook's receipt to the verified copy being recorded (the URL lives 5 min, "
    "the media id 7 days).",
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 6 * 3600, 24 * 3600, 7 * 86400),
)
URL_RESOLUTIONS = Counter(
    "ingest_url_resolutions_total",
    "Media ids resolved for a fresh URL (the webhook's was stale, refused or absent).",
    ["provider"],
)
LEASE_LOSSES = Counter(
    "ingest_lease_losses_total",
    "Leases that ran out (a worker died or stalled), counted by the reconciler.",
)
CALLBACK_DELIVERIES = Counter(
    "ingest_callback_deliveries_total",
    "Callback POSTs by outcome: delivered (2xx), retry (will be sent again), failed (gave up).",
    ["outcome"],
)
CALLBACK_EVENTS = Gauge(
    "ingest_callback_events",
    "Callback events by state (pending, delivered, failed), at the last reconciler pass.",
    ["state"],
    multiprocess_mode="mostrecent",
)
API_REQUESTS = Counter(
    "ingest_api_requests_total", "Archive API answers, by route and status.", ["route", "status"]
)

# Counters over a fixed set of labels start at zero in every process: their rate (and an
# alert on it) exists from the first scrape instead of appearing with the first event.
for _provider in Provider:
    URL_RESOLUTIONS.labels(_provider.value)
    BUDGET_BLOCKED.labels(_provider.value, "media")
BUDGET_BLOCKED.labels(Provider.D360.value, "lookup")
for _outcome in ("delivered", "retry", "failed"):
    CALLBACK_DELIVERIES.labels(_outcome)


def render() -> bytes:
    """The exposition text, merged across processes when multi-process mode is on."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
