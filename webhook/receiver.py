"""The webhook receiver: verify, parse, record (one transaction), commit, wake workers, 200.

The acknowledgement makes no outbound HTTP call: only SQL and, best effort, the broker. A 2xx
means the rows are committed; the database down is a 503 so the provider retries; the broker
down after the commit is still a 200 (the reconciler finds the pending rows).
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
from werkzeug.exceptions import RequestEntityTooLarge

from ingest import metrics
from ingest.accounts import find_instance
from ingest.db import DATABASE_DOWN
from ingest.events import ParsedWebhook, PayloadError, has_control_character, parse_body
from ingest.intake import (
    InstanceDirectory,
    Recorded,
    RoutedEvent,
    authenticate,
    forget_enqueued,
    is_one_insert,
    record_events,
    verify_token_matches,
)
from ingest.models import Instance, utcnow
from ingest.queues import DownloadScheduler, SchedulerUnavailable
from ingest.services import Services
from webhook.errors import database_error_kind, error_response

log = logging.getLogger(__name__)

bp = Blueprint("receiver", __name__)

MAX_CHALLENGE_CHARS = 256


class Rejected(Exception):
    """Ends a request with an error answer; nothing has been written."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Outcome:
    """What the request log line reports."""

    instance: str = "-"
    media: int = 0
    new: int = 0
    ignored: int = 0
    enqueued: bool = False


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
                    session.scalars(select(Instance).where(Instance.verify_token.is_not(None)))
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
    outcome = Outcome(instance=_loggable(instance) if instance else "-")
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
            "webhook status=%d instance=%s media=%d new=%d ignored=%d enqueued=%s latency_ms=%.1f",
            status,
            outcome.instance,
            outcome.media,
            outcome.new,
            outcome.ignored,
            "yes" if outcome.enqueued else "no",
            (time.perf_counter() - started) * 1000,
        )


def _receive(instance_name: str | None, outcome: Outcome) -> Response:
    services: Services = current_app.extensions["ingest"]
    scheduler: DownloadScheduler = current_app.extensions["ingest.scheduler"]
    raw = _read_body(services.settings.webhook_max_bytes)
    received_at = utcnow()
    directory = _directory(services)

    with _database_errors(directory):
        if instance_name is not None:
            parsed, routed = _route_to_instance(directory, instance_name, raw)
        else:
            parsed, routed = _route_by_phone_number(directory, raw, outcome)
        outcome.ignored = parsed.ignored
        for fault in parsed.unattached_faults:
            log.warning("webhook provider error without a message: %s", fault.describe())
        # One Core transaction, opened only once the request is authenticated and parsed (a
        # rejection writes nothing); the insert tracks no ORM objects, so a Session would
        # only add bookkeeping. Committed on leaving the block, rolled back on any error.
        # A POST that fits one INSERT (nearly all: one message) is atomic by itself and runs
        # in autocommit, without the BEGIN and COMMIT round trips; a larger one keeps its
        # transaction, so a POST is recorded whole or not at all.
        engine = services.one_statement if is_one_insert(routed) else services.engine
        with engine.begin() as connection:
            recorded = record_events(
                connection, routed, settings=services.settings, received_at=received_at
            )

    outcome.media = recorded.media
    outcome.new = recorded.new
    metrics.WEBHOOK_MEDIA.labels(result="new").inc(recorded.new)
    metrics.WEBHOOK_MEDIA.labels(result="repeated").inc(recorded.media - recorded.new)
    _wake_workers(services, scheduler, recorded, outcome)
    return _accepted(recorded)


def _read_body(max_bytes: int) -> bytes:
    if request.content_length is not None and request.content_length > max_bytes:
        raise Rejected(413, "Request body too large")
    if request.mimetype != "application/json":
        raise Rejected(415, "Content-Type must be application/json")
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise Rejected(413, "Request body too large") from None
    if len(raw) > max_bytes:
        raise Rejected(413, "Request body too large")
    return raw


def _directory(services: Services) -> InstanceDirectory:
    """The process's instance cache, created on first use (after gunicorn forked)."""
    directory = current_app.extensions.get("ingest.instances")
    if directory is None:
        directory = current_app.extensions.setdefault(
            "ingest.instances", InstanceDirectory(services.sessions)
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
    directory: InstanceDirectory, name: str, raw: bytes
) -> tuple[ParsedWebhook, list[RoutedEvent]]:
    """``POST /webhook/<instance>``: authenticate before reading the body at all."""
    # A name with a control character names no instance; asked, PostgreSQL would refuse it.
    instance = None if has_control_character(name) else directory.by_name(name)
    if instance is None:
        raise Rejected(404, "Instance not found")
    if not authenticate(instance, raw, request.headers):
        raise Rejected(401, "Invalid signature")
    parsed = _parse(raw)
    foreign = [pid for pid in parsed.phone_number_ids if pid != instance.phone_number_id]
    if foreign:
        raise Rejected(400, "Payload names a phone number id of another instance")
    return parsed, [RoutedEvent(instance.id, event) for event in parsed.media]


def _route_by_phone_number(
    directory: InstanceDirectory, raw: bytes, outcome: Outcome
) -> tuple[ParsedWebhook, list[RoutedEvent]]:
    """``POST /webhook``: each change goes to the instance its phone number id names."""
    parsed = _parse(raw)
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


def _parse(raw: bytes) -> ParsedWebhook:
    try:
        return parse_body(raw)
    except PayloadError as exc:
        raise Rejected(400, str(exc)) from None


def _wake_workers(
    services: Services, scheduler: DownloadScheduler, recorded: Recorded, outcome: Outcome
) -> None:
    if not recorded.jobs:
        return
    try:
        scheduler.schedule(recorded.jobs)
        outcome.enqueued = True
    except SchedulerUnavailable as exc:
        # The rows are committed and pending: the reconciler will wake a worker for them.
        log.warning(
            "webhook: broker unavailable (%s); %d row(s) left for the reconciler",
            exc,
            len(recorded.jobs),
        )
        _forget_enqueued(services, recorded)


def _forget_enqueued(services: Services, recorded: Recorded) -> None:
    try:
        with services.sessions.begin() as session:
            forget_enqueued(session, recorded.jobs)
    except DATABASE_DOWN:
        # Best effort only: the reconciler still finds the rows once their wake-up is old.
        log.warning("webhook: could not clear enqueued_at after a broker failure")


def _accepted(recorded: Recorded) -> Response:
    return jsonify(
        {
            "success": True,
            "message": "Webhook accepted",
            "media": recorded.media,
            "new": recorded.new,
        }
    )
