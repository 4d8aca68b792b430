"""Delivery of the callback outbox (:mod:`ingest.callbacks`): claim a due event, POST it
signed, record the answer.

:func:`deliver_due`, run every couple of seconds by a thread of each worker process
(:class:`CallbackLoop`), claims one due event at a time with a conditional ``UPDATE`` (so any
number of processes may run it), POSTs it, and records the answer: 2xx is delivered;
anything else is retried with exponential backoff (5 s doubling, capped at an hour, half of
each delay random) until ``callback_give_up_hours`` after the event was created, then
``failed``. A receiver that fails is tried once per pass, so a dead one costs each pass one
timeout, not one per event.

Egress: any host name and port the operator configured, but addresses must be public unless
listed in ``callback_private_addresses``, checked where the socket is opened
(:class:`ingest.egress_guard.PublicAddressPolicy`); no redirects followed (a 3xx is a failure), no
proxies from the environment. Logs and ``last_error`` name the host only, never the URL (its
query may carry a token).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ingest.attempt_errors import short
from ingest.callbacks import EventState, signature_headers
from ingest.db import row_count, session_scope
from ingest.egress_guard import (
    HostPolicy,
    PublicAddressPolicy,
    RefusedAddress,
    Resolver,
    guarded_client,
)
from ingest.models import CallbackEvent, Instance, utcnow
from ingest.periodic import PeriodicThread
from ingest.secrets import SecretBox, secret_box
from ingest.settings import Settings

log = logging.getLogger(__name__)

USER_AGENT = "ingest-media-callbacks/1"

# Retry delays: 5 s doubling per attempt, capped at an hour, with equal jitter (half fixed,
# half random) so the events of one outage do not come back together.
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 3600.0
# A claim holds its event this much longer than one POST may take (httpx's timeout is per
# phase: connect, write, read); past it, another process may send the event again.
LEASE_TIMEOUTS = 4
LEASE_MARGIN_SECONDS = 30.0
# Events sent per pass at most; the next pass (seconds later) takes the rest.
DEFAULT_BATCH = 100
# Due events read per claim; several, so a process that loses a race tries the next one.
CANDIDATES = 10


@dataclass(frozen=True)
class SendResult:
    """One POST's answer: its status (None when none came) and, unless 2xx, why it failed
    (names the host, never the URL)."""

    status: int | None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None


class CallbackSender:
    """The HTTP side of delivery, built once per worker process; thread-safe, close it on
    shutdown. ``clock`` gives the time of each attempt (tests move it)."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.policy: HostPolicy = PublicAddressPolicy.from_hosts(
            settings.callback_private_addresses
        )
        self._client = guarded_client(
            self.policy,
            timeout=settings.callback_timeout_seconds,
            user_agent=USER_AGENT,
            resolver=resolver,
        )

    def box(self) -> SecretBox:
        return secret_box(self.settings)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CallbackSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self, url: str, secret: str, event_id: str, body: str, timestamp: datetime
    ) -> SendResult:
        """POST ``body`` signed for ``timestamp``; never follows a redirect, never reads
        more of the answer than its status line and headers."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            return SendResult(None, "the callback URL is not readable")
        host = parsed.host or "?"
        if parsed.scheme not in ("http", "https") or not parsed.host:
            return SendResult(None, "only http(s) callback URLs with a host are used")
        headers = {
            "Content-Type": "application/json",
            **signature_headers(secret, event_id, body, timestamp),
        }
        try:
            with self._client.stream(
                "POST", parsed, content=body.encode("utf-8"), headers=headers
            ) as response:
                status = response.status_code
        except RefusedAddress:
            return SendResult(None, f"{host} resolves to an address that is not allowed")
        except httpx.TimeoutException as exc:
            return SendResult(None, f"{host} timed out ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return SendResult(None, f"connection to {host} failed ({type(exc).__name__})")
        if 200 <= status < 300:
            return SendResult(status)
        if 300 <= status < 400:
            return SendResult(status, f"{host} answered a redirect (HTTP {status}), not followed")
        return SendResult(status, f"{host} answered HTTP {status}")


def backoff_seconds(attempts: int, rng: random.Random) -> float:
    """The wait after the ``attempts``-th failed POST (1 = first)."""
    exponent = min(max(attempts, 1) - 1, 32)
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2.0**exponent)
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class _Claimed:
    id: int
    event_id: str
    event_type: str
    body: str
    attempts: int
    created_at: datetime
    instance_id: int
    instance_name: str
    url: str = field(repr=False)
    secret: str = field(repr=False)


@dataclass
class DeliveryReport:
    delivered: int = 0
    retried: int = 0
    failed: int = 0

    @property
    def attempted(self) -> int:
        return self.delivered + self.retried + self.failed


def _due(now: datetime) -> Any:
    return (
        (CallbackEvent.state == EventState.PENDING)
        & (CallbackEvent.next_attempt_at <= now)
        & (CallbackEvent.lease_until.is_(None) | (CallbackEvent.lease_until < now))
    )


def _claim_next(
    sessions: sessionmaker[Session], sender: CallbackSender, now: datetime, skip: set[int]
) -> _Claimed | None:
    """Take the next due event with a lease, or None when nothing is due (for instances not
    in ``skip``). An event whose instance lost its callback URL is failed on the way."""
    lease = timedelta(
        seconds=LEASE_TIMEOUTS * sender.settings.callback_timeout_seconds + LEASE_MARGIN_SECONDS
    )
    with session_scope(sessions) as session:
        query = (
            select(
                CallbackEvent.id,
                CallbackEvent.event_id,
                CallbackEvent.event_type,
                CallbackEvent.body,
                CallbackEvent.created_at,
                CallbackEvent.instance_id,
                Instance.name,
                Instance.callback_url,
                Instance.callback_secret_encrypted,
            )
            .join(Instance, Instance.id == CallbackEvent.instance_id)
            .where(_due(now))
            .order_by(CallbackEvent.next_attempt_at, CallbackEvent.id)
            .limit(CANDIDATES)
        )
        if skip:
            query = query.where(CallbackEvent.instance_id.not_in(sorted(skip)))
        for row in session.execute(query).all():
            if row.callback_url is None or row.callback_secret_encrypted is None:
                session.execute(
                    update(CallbackEvent)
                    .where(CallbackEvent.id == row.id, _due(now))
                    .values(
                        state=EventState.FAILED,
                        last_error="the instance's callback URL was removed",
                    )
                    .execution_options(synchronize_session=False)
                )
                continue
            # Decrypted before the claim: without the key nothing is claimed only to fail.
            secret = sender.box().decrypt(row.callback_secret_encrypted)
            attempts = session.execute(
                update(CallbackEvent)
                .where(CallbackEvent.id == row.id, _due(now))
                .values(lease_until=now + lease, attempts=CallbackEvent.attempts + 1)
                .returning(CallbackEvent.attempts)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
            if attempts is None:
                continue  # another process claimed it first
            return _Claimed(
                id=row.id,
                event_id=row.event_id,
                event_type=row.event_type,
                body=row.body,
                attempts=attempts,
                created_at=row.created_at,
                instance_id=row.instance_id,
                instance_name=row.name,
                url=row.callback_url,
                secret=secret,
            )
    return None


def _record(
    sessions: sessionmaker[Session],
    sender: CallbackSender,
    event: _Claimed,
    result: SendResult,
    now: datetime,
) -> str | None:
    """Write the attempt's result; the outcome (delivered, retry, failed), or None if the
    event was no longer ours (its lease ran out and another process claimed it)."""
    values: dict[str, Any] = {"last_status": result.status, "lease_until": None}
    if result.delivered:
        outcome = "delivered"
        values.update(state=EventState.DELIVERED, delivered_at=now, last_error=None)
    else:
        values["last_error"] = short(result.error or "")
        deadline = event.created_at + timedelta(hours=sender.settings.callback_give_up_hours)
        if now >= deadline:
            outcome = "failed"
            values["state"] = EventState.FAILED
        else:
            outcome = "retry"
            delay = timedelta(seconds=backoff_seconds(event.attempts, sender.rng))
            # The last try comes at the deadline, not an hour past it.
            values["next_attempt_at"] = min(now + delay, deadline)
    with session_scope(sessions) as session:
        written = session.execute(
            update(CallbackEvent)
            .where(CallbackEvent.id == event.id)
            .where(CallbackEvent.state == EventState.PENDING)
            .where(CallbackEvent.attempts == event.attempts)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if row_count(written) != 1:
            return None
    return outcome


def deliver_due(
    sessions: sessionmaker[Session],
    sender: CallbackSender,
    now: datetime | None = None,
    limit: int = DEFAULT_BATCH,
    *,
    stop: threading.Event | None = None,
) -> DeliveryReport:
    """Send due events, one claim at a time, up to ``limit``. Safe in any number of
    processes at once. ``now`` fixes the time of the whole pass (tests); by default each
    attempt reads ``sender.clock``."""
    # Imported here: the CLI imports this module (configure), and prometheus_client must not
    # be imported before `ingest web` and `ingest worker` set its multi-process directory.
    from ingest import metrics

    report = DeliveryReport()
    failing: set[int] = set()
    while report.attempted < limit and not (stop is not None and stop.is_set()):
        at = now or sender.clock()
        event = _claim_next(sessions, sender, at, failing)
        if event is None:
            break
        result = sender.send(event.url, event.secret, event.event_id, event.body, at)
        outcome = _record(sessions, sender, event, result, now or sender.clock())
        if outcome is None:
            log.warning("callback %s: lease ran out before the answer was recorded", event.event_id)
            continue
        metrics.CALLBACK_DELIVERIES.labels(outcome).inc()
        if outcome == "delivered":
            report.delivered += 1
        else:
            # One failure per receiver per pass: its other events wait for the next one.
            failing.add(event.instance_id)
            if outcome == "retry":
                report.retried += 1
            else:
                report.failed += 1
        line = "callback %s instance=%s type=%s attempt=%d outcome=%s status=%s%s"
        arguments = (
            event.event_id,
            event.instance_name,
            event.event_type,
            event.attempts,
            outcome,
            result.status if result.status is not None else "-",
            f" error={result.error}" if result.error else "",
        )
        if outcome == "failed":
            log.warning(line + " (gave up)", *arguments)
        else:
            log.info(line, *arguments)
    return report


class CallbackLoop(PeriodicThread):
    """Delivers due events every ``interval_seconds`` (see :mod:`ingest.periodic`); a pass
    stops between two events once the loop is stopping."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        sender: CallbackSender,
        interval_seconds: float,
    ) -> None:
        super().__init__(
            "callbacks",
            lambda: deliver_due(sessions, sender, stop=self.stopping),
            interval_seconds,
        )
