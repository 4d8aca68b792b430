"""The webhook receiver: verify, parse, record (one transaction), commit, 200.

The acknowledgement makes no outbound call but SQL: a 2xx means the rows are committed, and
the database down is a 503 so the provider retries. The broker is not on this path at all:
the relay in the workers publishes the committed rows' wake-ups (``ingest.wake_relay``).

Bounds: a body over ``webhook_max_bytes`` is 413 however it is framed (``Content-Length`` or
chunked), before anything else; one naming more than ``webhook_max_items`` distinct phone
number ids, or media items, is 413 too, counted while parsing: on ``/webhook`` before the
lookup of those ids, on ``/webhook/<instance>`` after the one lookup by name and the signature
(that route never parses an unauthenticated body), before any insert.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ingest import metrics
from ingest.accounts import find_instance
from ingest.db import DATABASE_DOWN
from ingest.events import (
    ParsedWebhook,
    PayloadError,
    TooManyItems,
    has_control_character,
    parse_body,
)
from ingest.intake import (
    InstanceDirectory,
    Recorded,
    RoutedEvent,
    authenticate,
    record_webhook,
    verify_token_matches,
)
from ingest.models import Instance, utcnow
from ingest.secrets import secret_box
from ingest.services import Services
from webhook.errors import database_error_kind, error_response

log = logging.getLogger(__name__)

bp = Blueprint("receiver", __name__)

MAX_CHALLENGE_CHARS = 256
# Reads of the request body: a chunked body is taken this much at a time up to its limit.
READ_CHUNK = 64 * 1024


class Rejected(Exception):
    """Ends a request with an error answer; nothing has been written."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RequestSummary:
    """What the request log line reports."""

    instance: str = "-"
    media: int = 0
    new: int = 0
    ignored: int = 0


# --- verification handshake --------------------------------------------------------------


@bp.get("/webhook")
@bp.get("/webhook/<instance>")
def verify(instance: str | None = None) -> Response:
    mode = request.args.get("hub.mode")
    token = request.args.get("hub.verify_token")
    challenge = request.args.get("hub.challenge")
    if mode != "subscribe" or not token or not challenge or len(challenge) > MAX_CHALLENGE_CHARS:
        return error_response(403, "Verification failed")
    services: Services = current_app.extensions["ingest"]
    try:
        with services.sessions() as session:
            if instance is None:
                candidates = list(
                    session.scalars(select(Instance).where(Instance.verify_token_hash.is_not(None)))
                )
            elif has_control_character(instance):  # names nothing; never sent to the database
                candidates = []
            else:
                found = find_instance(session, instance)
                candidates = [found] if found is not None else []
    except DATABASE_DOWN as exc:
        log.warning("webhook handshake: database unavailable (%s)", database_error_kind(exc))
        return error_response(503, "Service unavailable", {"Retry-After": "5"})
    if not verify_token_matches(token, candidates):
        return error_response(403, "Verification failed")
    response = Response(challenge, status=200, mimetype="text/plain")
    # The challenge is caller-chosen text: never let a browser read it as anything else.
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# --- event delivery ------------------------------------------------------------------------


@bp.post("/webhook")
@bp.post("/webhook/<instance>")
def receive(instance: str | None = None) -> Response:
    started = time.perf_counter()
    outcome = RequestSummary(instance=_loggable(instance) if instance else "-")
    status = 500
    try:
        response = _receive(instance, outcome)
        status = response.status_code
        return response
    except Rejected as rejected:
        status = rejected.status
        headers = {"Retry-After": "5"} if status == 503 else None
        return error_response(status, rejected.message, headers)
    finally:
        metrics.WEBHOOK_REQUESTS.labels(status=str(status)).inc()
        # One line per request; names and counts only (never a URL, token or secret).
        log.info(
            "webhook status=%d instance=%s media=%d new=%d ignored=%d latency_ms=%.1f",
            status,
            outcome.instance,
            outcome.media,
            outcome.new,
            outcome.ignored,
            (time.perf_counter() - started) * 1000,
        )


def _receive(instance_name: str | None, outcome: RequestSummary) -> Response:
    services: Services = current_app.extensions["ingest"]
    settings = services.settings
    raw = _read_body(settings.webhook_max_bytes)
    received_at = utcnow()
    directory = _directory(services)

    with _database_errors(directory):
        if instance_name is not None:
            parsed, routed = _route_to_instance(
                directory, instance_name, raw, settings.webhook_max_items
            )
        else:
            parsed, routed = _route_by_phone_number(
                directory, raw, outcome, settings.webhook_max_items
            )
        outcome.ignored = parsed.ignored
        for fault in parsed.unattached_faults:
            log.warning("webhook provider error without a message: %s", fault.describe())
        if parsed.dropped_urls:
            # Counted only: the URL is confidential, and may have been chosen by the sender.
            log.warning(
                "webhook: ignored %d media URL(s) not in the CDN attachment form; "
                "their media ids will be resolved",
                parsed.dropped_urls,
            )
        # Written only once the request is authenticated and parsed (a rejection writes
        # nothing), on a Core connection or the driver's: no ORM objects to track.
        recorded = record_webhook(
            services.engine,
            services.one_statement,
            routed,
            settings=settings,
            received_at=received_at,
        )

    outcome.media = recorded.media
    outcome.new = recorded.new
    metrics.WEBHOOK_MEDIA.labels(result="new").inc(recorded.new)
    metrics.WEBHOOK_MEDIA.labels(result="repeated").inc(recorded.media - recorded.new)
    return _accepted(recorded)


def _read_body(max_bytes: int) -> bytes:
    """Every byte of the body, or a rejection: 413 past ``max_bytes`` whatever the framing.

    Read from the WSGI input ourselves, never through ``request.stream``/``get_data``: for a
    chunked body Werkzeug's limit stops reading at the maximum without raising, so a longer
    body was cut there and processed, its signature checked over the cut. Here a body without
    ``Content-Length`` is read up to ``max_bytes + 1`` bytes, and one byte more is a 413.
    """
    # None for a chunked body: Werkzeug reports no length then, whatever a header says.
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise Rejected(413, "Request body too large")
    if request.mimetype != "application/json":
        raise Rejected(415, "Content-Type must be application/json")
    environ = request.environ
    if declared is None and not environ.get("wsgi.input_terminated"):
        # The server does not delimit the input (no chunked decoding): reading it could run
        # into the next request or block until the client hangs up.
        raise Rejected(411, "Content-Length or chunked transfer encoding required")
    stream = environ["wsgi.input"]
    wanted = declared if declared is not None else max_bytes + 1
    parts: list[bytes] = []
    received = 0
    while received < wanted:
        try:
            chunk = stream.read(min(READ_CHUNK, wanted - received))
        except Exception as exc:  # noqa: BLE001
            # The client went away mid-body, or broke the chunked framing: each WSGI server
            # has its own types for that (gunicorn's parse errors are no OSError), and none
            # is ours to retry. A client error, not a 500.
            log.info("webhook: request body unreadable (%s)", type(exc).__name__)
            raise Rejected(400, "Request body incomplete") from None
        if not chunk:
            break
        parts.append(chunk)
        received += len(chunk)
    if received > max_bytes:
        raise Rejected(413, "Request body too large")
    if declared is not None and received < declared:
        raise Rejected(400, "Request body incomplete")
    return b"".join(parts)


def _directory(services: Services) -> InstanceDirectory:
    """The process's instance cache, created on first use (after gunicorn forked)."""
    directory = current_app.extensions.get("ingest.instances")
    if directory is None:
        directory = current_app.extensions.setdefault(
            "ingest.instances",
            InstanceDirectory(services.sessions, box=secret_box(services.settings)),
        )
    assert isinstance(directory, InstanceDirectory)
    return directory


@contextmanager
def _database_errors(directory: InstanceDirectory) -> Iterator[None]:
    """A database that is down becomes a 503; so does an instance deleted under us.

    The error's text is never logged: it may quote the row (PostgreSQL's "Failing row
    contains ..."), and the row holds the signed URL, the caption and the sender.
    """
    try:
        yield
    except IntegrityError:
        # Only the instance foreign key can fail (conflicts are ignored): the instance went
        # away after we cached it. Forget the cache; the provider's retry gets a fresh answer.
        directory.forget()
        log.warning("webhook: instance vanished while recording; asking for a retry")
        raise Rejected(503, "Service unavailable") from None
    except DATABASE_DOWN as exc:
        log.warning("webhook: database unavailable (%s)", database_error_kind(exc))
        raise Rejected(503, "Service unavailable") from None


def _loggable(name: str) -> str:
    # The name comes from the URL path: a decoded newline must not start a forged log line.
    return name.encode("unicode_escape").decode("ascii") if has_control_character(name) else name


def _route_to_instance(
    directory: InstanceDirectory, name: str, raw: bytes, max_items: int
) -> tuple[ParsedWebhook, list[RoutedEvent]]:
    """``POST /webhook/<instance>``: authenticate before reading the body at all (one lookup
    by name, whatever the body says)."""
    # A name with a control character names no instance; asked, PostgreSQL would refuse it.
    instance = None if has_control_character(name) else directory.by_name(name)
    if instance is None:
        raise Rejected(404, "Instance not found")
    if not authenticate(instance, raw, request.headers):
        raise Rejected(401, "Invalid signature")
    parsed = _parse(raw, max_items)
    foreign = [pid for pid in parsed.phone_number_ids if pid != instance.phone_number_id]
    if foreign:
        raise Rejected(400, "Payload names a phone number id of another instance")
    return parsed, [RoutedEvent(instance.id, event) for event in parsed.media]


def _route_by_phone_number(
    directory: InstanceDirectory, raw: bytes, outcome: RequestSummary, max_items: int
) -> tuple[ParsedWebhook, list[RoutedEvent]]:
    """``POST /webhook``: each change goes to the instance its phone number id names.

    The body is parsed (and its ids counted against ``max_items``) before the lookup: tens of
    thousands of ids once cost most of a second, or PostgreSQL's parameter limit, before any
    signature was checked.
    """
    parsed = _parse(raw, max_items)
    if not parsed.phone_number_ids:
        # Nothing to route and nothing to record (account notifications and the like):
        # acknowledged, so the provider does not retry it for days.
        if any(event.phone_number_id is None for event in parsed.media):
            raise Rejected(404, "Unknown phone number id")
        return parsed, []
    known = directory.by_phone_number_ids(parsed.phone_number_ids)
    if not known:
        raise Rejected(404, "Unknown phone number id")
    unknown = [pid for pid in parsed.phone_number_ids if pid not in known]
    if unknown:
        log.warning("webhook: skipped %d change(s) for unknown phone number ids", len(unknown))
    # One body has one signature: it must be valid for every instance it will write to.
    for instance in known.values():
        if not authenticate(instance, raw, request.headers):
            raise Rejected(401, "Invalid signature")
    outcome.instance = ",".join(sorted(instance.name for instance in known.values()))
    routed = [
        RoutedEvent(known[event.phone_number_id].id, event)
        for event in parsed.media
        if event.phone_number_id is not None and event.phone_number_id in known
    ]
    return parsed, routed


def _parse(raw: bytes, max_items: int) -> ParsedWebhook:
    try:
        return parse_body(raw, max_items=max_items)
    except TooManyItems as exc:
        # 413, like a body over the byte limit: the request is too large to take, not
        # malformed (and, like it, the provider's own batches stay far under the bound).
        raise Rejected(413, str(exc)) from None
    except PayloadError as exc:
        raise Rejected(400, str(exc)) from None


def _accepted(recorded: Recorded) -> Response:
    return jsonify(
        {
            "success": True,
            "message": "Webhook accepted",
            "media": recorded.media,
            "new": recorded.new,
        }
    )
