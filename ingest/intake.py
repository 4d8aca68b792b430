"""Accepting a webhook: who may post it, and recording its media rows durably.

The receiver calls, in order: :func:`authenticate` (per instance the body is routed to), then
:func:`record_events` inside one transaction, and commits. It publishes nothing: a new row has
no wake-up yet, and the relay in the workers (``ingest.wake_relay``) publishes one once the
row is committed. A repeated delivery of the same ``(instance, message id)`` inserts nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session, sessionmaker

from ingest import callbacks, media_rows
from ingest.accounts import hash_secret, secret_matches
from ingest.events import MediaEvent
from ingest.media_rows import INSERT_CHUNK
from ingest.media_rules import over_send_limit
from ingest.models import Instance
from ingest.secrets import SecretBox, environment_secret_box
from ingest.settings import Settings

SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_PREFIX = "sha256="
# The direct-download URL in a webhook is valid this long once issued (provider docs).
URL_LIFETIME = timedelta(minutes=5)
# How long a worker process trusts its cached copy of an instance's route and secrets.
INSTANCE_CACHE_SECONDS = 5.0


class HeaderLookup(Protocol):
    def get(self, key: str, /) -> str | None: ...


class WebhookCredentials(Protocol):
    """What authenticating a post needs of an instance (a cached :class:`InstanceRoute`,
    whose app secret is decrypted)."""

    @property
    def app_secret(self) -> str | None: ...
    @property
    def webhook_secret_header(self) -> str | None: ...
    @property
    def webhook_secret_hash(self) -> str | None: ...
    @property
    def allow_unsigned(self) -> bool: ...


def signature_valid(raw_body: bytes, header_value: str | None, app_secret: str) -> bool:
    """Meta's ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app secret, body)>``.

    Computed over the exact bytes received: Meta signs its own serialisation (non-ASCII
    escaped), so re-serialising parsed JSON would not match.
    """
    if not header_value or not header_value.startswith(SIGNATURE_PREFIX):
        return False
    expected = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()
    given = header_value[len(SIGNATURE_PREFIX) :].strip().lower()
    return hmac.compare_digest(expected.encode(), given.encode("ascii", "replace"))


def sign(raw_body: bytes, app_secret: str) -> str:
    """The header value Meta would send for this body (for tests, the demo and benchmarks)."""
    digest = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def authenticate(instance: WebhookCredentials, raw_body: bytes, headers: HeaderLookup) -> bool:
    """True if the request proves it comes from this instance's provider.

    Every check the instance configures must pass: the Meta signature when it has an app
    secret, the shared-secret header (360dialog) when it has one. An instance with neither
    takes a post only if the operator allowed unsigned webhooks for it by name; one from
    before that consent existed, or whose checks were lost, takes nothing.
    """
    signed = bool(instance.app_secret)
    shared = bool(instance.webhook_secret_header and instance.webhook_secret_hash)
    if not (signed or shared):
        return instance.allow_unsigned
    if instance.app_secret and not signature_valid(
        raw_body, headers.get(SIGNATURE_HEADER), instance.app_secret
    ):
        return False
    if instance.webhook_secret_header and instance.webhook_secret_hash:
        presented = headers.get(instance.webhook_secret_header)
        if not presented or not secret_matches(presented, instance.webhook_secret_hash):
            return False
    return True


def verify_token_matches(presented: str, instances: Iterable[Instance]) -> bool:
    """Meta's subscription handshake: does ``presented`` equal any instance's verify token?

    Only hashes are stored: ``presented`` is hashed once, and every candidate's hash is
    compared (constant time each), so the answer's timing does not say which instance, or
    how much of a token, matched.
    """
    digest = hash_secret(presented).encode()
    results = [
        hmac.compare_digest(digest, instance.verify_token_hash.encode())
        for instance in instances
        if instance.verify_token_hash
    ]
    return any(results)


@dataclass(frozen=True)
class InstanceRoute:
    """The columns of an instance the receiver needs, detached from any session, with the
    app secret decrypted (it signs nothing here, it only checks)."""

    id: int
    name: str
    phone_number_id: str
    app_secret: str | None = field(repr=False)
    webhook_secret_header: str | None
    webhook_secret_hash: str | None = field(repr=False)
    allow_unsigned: bool = False

    @classmethod
    def of(cls, row: Instance, box: SecretBox | None) -> InstanceRoute:
        """``box`` decrypts the app secret; it may be None for a row that has none."""
        app_secret = None
        if row.app_secret_encrypted:
            if box is None:
                raise ValueError(f"instance {row.name!r} has an app secret and no box was given")
            app_secret = box.decrypt(row.app_secret_encrypted)
        return cls(
            id=row.id,
            name=row.name,
            phone_number_id=row.phone_number_id,
            app_secret=app_secret,
            webhook_secret_header=row.webhook_secret_header,
            webhook_secret_hash=row.webhook_secret_hash,
            allow_unsigned=row.allow_unsigned,
        )


class InstanceDirectory:
    """A per-process read-through cache of instance routes, so a webhook costs one
    transaction (the insert) instead of two.

    Only instances that exist are cached, for ``ttl_seconds``: a new instance is found at
    once; a rotated secret or a renamed instance is seen within the TTL. Recording never
    depends on the cached ``connected`` flag (disconnected instances still record). App
    secrets are decrypted once per cache fill, not per request.

    ``box``: the process's :func:`ingest.secrets.secret_box`. Without it, the box of the
    process's environment (``INGEST_SECRET_KEY``) for the sessions' database, found on the
    first app secret: what a process started by ``ingest web`` runs with.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        ttl_seconds: float = INSTANCE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        box: SecretBox | None = None,
    ) -> None:
        self._sessions = sessions
        self._ttl = ttl_seconds
        self._clock = clock
        self._box = box
        self._lock = threading.Lock()
        self._by_name: dict[str, tuple[float, InstanceRoute]] = {}
        self._by_phone: dict[str, tuple[float, InstanceRoute]] = {}

    def by_name(self, name: str) -> InstanceRoute | None:
        cached = self._fresh(self._by_name, [name])
        if name in cached:
            return cached[name]
        with self._sessions() as session:
            row = session.scalar(select(Instance).where(Instance.name == name))
            route = self._route(row) if row is not None else None
        if route is not None:
            self._remember([route])
        return route

    def by_phone_number_ids(self, phone_number_ids: Sequence[str]) -> dict[str, InstanceRoute]:
        found = self._fresh(self._by_phone, phone_number_ids)
        missing = [pid for pid in phone_number_ids if pid not in found]
        if missing:
            with self._sessions() as session:
                rows = session.scalars(
                    select(Instance).where(Instance.phone_number_id.in_(missing))
                )
                routes = [self._route(row) for row in rows]
            self._remember(routes)
            found.update((route.phone_number_id, route) for route in routes)
        return found

    def _route(self, row: Instance) -> InstanceRoute:
        return InstanceRoute.of(row, self._secret_box() if row.app_secret_encrypted else None)

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            bind = self._sessions.kw["bind"]
            self._box = environment_secret_box(bind.url.render_as_string(hide_password=False))
        return self._box

    def forget(self) -> None:
        with self._lock:
            self._by_name.clear()
            self._by_phone.clear()

    def _fresh(
        self, index: dict[str, tuple[float, InstanceRoute]], keys: Sequence[str]
    ) -> dict[str, InstanceRoute]:
        now = self._clock()
        with self._lock:
            hits = {key: index[key] for key in keys if key in index}
        return {key: route for key, (until, route) in hits.items() if until > now}

    def _remember(self, routes: Iterable[InstanceRoute]) -> None:
        until = self._clock() + self._ttl
        with self._lock:
            for route in routes:
                self._by_name[route.name] = (until, route)
                self._by_phone[route.phone_number_id] = (until, route)


@dataclass(frozen=True)
class RoutedEvent:
    instance_id: int
    event: MediaEvent


@dataclass(frozen=True)
class Recorded:
    """What one webhook added: rows created (new, of which failed), and rows it named again
    whose wake-up was old and is sent again (rewoken)."""

    media: int
    new: int
    failed: int
    rewoken: int = 0


def record_events(
    session: Session | Connection,
    events: Sequence[RoutedEvent],
    *,
    settings: Settings,
    received_at: datetime,
) -> Recorded:
    """Insert one row per ``(instance, message id)``, ignoring those that already exist.

    Runs inside the caller's transaction (nothing is committed here), on an ORM session or a
    bare Core connection (the receiver's choice: it has no ORM objects to track). Uses the dialect's
    ``INSERT .. ON CONFLICT DO NOTHING .. RETURNING``, so concurrent deliveries of one message
    race safely in the database and exactly one of them learns the row is new. Provider error
    events become ``failed`` rows; they are announced to their instance's
    callback URL (ingest.callbacks) in the same transaction.
    """
    unique: dict[tuple[int, str], RoutedEvent] = {}
    for routed in events:
        unique.setdefault((routed.instance_id, routed.event.message_id), routed)
    rows = [_row(routed, settings, received_at) for routed in unique.values()]

    new = failed = 0
    inserted: set[tuple[int, str]] = set()
    failed_ids: list[int] = []
    for item_id, instance_id, message_id in media_rows.record(session, rows):
        new += 1
        inserted.add((instance_id, message_id))
        if unique[(instance_id, message_id)].event.fault is not None:
            failed += 1
            failed_ids.append(item_id)
    if failed_ids:
        callbacks.announce(session, failed_ids, received_at)
    repeated = [
        key for key, routed in unique.items() if key not in inserted and routed.event.fault is None
    ]
    rewoken = _wake_repeats(session, repeated, settings, received_at) if repeated else 0
    return Recorded(media=len(events), new=new, failed=failed, rewoken=rewoken)


def record_webhook(
    engine: Engine,
    one_statement: Engine,
    events: Sequence[RoutedEvent],
    *,
    settings: Settings,
    received_at: datetime,
) -> Recorded:
    """:func:`record_events` for one webhook, written the cheapest way that keeps it whole.

    One event that is no provider error, on PostgreSQL (nearly every webhook): its insert on
    the driver connection in autocommit (``media_rows.insert_directly``). Events that fit one
    INSERT: that statement in autocommit on ``one_statement``, atomic by itself, without the
    BEGIN and COMMIT round trips. Anything else (more rows, or a provider error, whose
    ``failed`` row is announced in the insert's transaction): one transaction on ``engine``,
    recorded whole or not at all.
    """
    if len(events) == 1 and events[0].event.fault is None and media_rows.inserts_directly(engine):
        routed = events[0]
        if media_rows.insert_directly(engine, _row(routed, settings, received_at)):
            return Recorded(media=1, new=1, failed=0)
        key = (routed.instance_id, routed.event.message_id)
        with one_statement.begin() as connection:
            rewoken = _wake_repeats(connection, [key], settings, received_at)
        return Recorded(media=1, new=0, failed=0, rewoken=rewoken)
    with (one_statement if is_one_insert(events) else engine).begin() as connection:
        return record_events(connection, events, settings=settings, received_at=received_at)


def _wake_repeats(
    executor: Session | Connection,
    repeated: Sequence[tuple[int, str]],
    settings: Settings,
    received_at: datetime,
) -> int:
    """Rows a webhook named again, already recorded: a provider redelivers when we did not
    answer, which may mean the process that committed them died first, so a wake-up older
    than :func:`wake_timeout` is presumed lost and sent again."""
    return media_rows.wake_redelivered(
        executor,
        repeated,
        now=received_at,
        stale_before=received_at - wake_timeout(settings),
    )


def wake_timeout(settings: Settings) -> timedelta:
    """How old a pending row's wake-up may grow before it is presumed lost when nothing
    else explains the wait (its queue is empty, or the provider redelivered the webhook)."""
    return timedelta(seconds=settings.reconcile_interval_seconds)


def is_one_insert(events: Sequence[RoutedEvent]) -> bool:
    """Does :func:`record_events` write these in a single statement (atomic by itself)?

    Not when a provider error event is among them: its ``failed`` row may be announced to a
    callback URL, a second statement that must share the insert's transaction."""
    return len(events) <= INSERT_CHUNK and all(routed.event.fault is None for routed in events)


def issued_at(event: MediaEvent, received_at: datetime) -> datetime:
    """When the provider's clocks on this media started: the URL's 5 minutes, the id's 7 days.

    Usually the moment we received it. A webhook redelivered late (after our endpoint was
    down) is older than its receipt, and its URL and media id are as old as the message:
    counting from receipt would try a dead URL as if fresh (a CDN error against the
    number's error budget) and keep an expired id for days. A timestamp ahead of our clock
    is skew, not news, and is ignored.
    """
    if event.timestamp is not None and event.timestamp < received_at:
        return event.timestamp
    return received_at


def _row(routed: RoutedEvent, settings: Settings, received_at: datetime) -> dict[str, Any]:
    event = routed.event
    issued = issued_at(event, received_at)
    row: dict[str, Any] = {
        "instance_id": routed.instance_id,
        "message_id": event.message_id,
        "media_id": event.media_id,
        "media_type": event.media_type.value,
        "declared_mime": event.mime_type,
        "actual_mime": None,
        "declared_sha256": event.sha256,
        "actual_sha256": None,
        "declared_size": event.file_size,
        "size": None,
        "filename": event.filename,
        "caption": event.caption,
        "sender": event.sender,
        "voice": event.voice,
        "animated": event.animated,
        # Known only when the webhook states a size; otherwise the worker decides.
        "over_send_limit": (
            event.file_size is not None
            and over_send_limit(event.media_type, event.file_size, animated=event.animated)
        ),
        "message_timestamp": event.timestamp,
        "received_at": received_at,
        "download_url": event.url,
        "url_deadline": issued + URL_LIFETIME if event.url else None,
        "expires_at": issued + timedelta(seconds=settings.media_retention_seconds),
        "attempts": 0,
        "lease_losses": 0,
        "next_attempt_at": received_at,
        "lease_until": None,
        "lease_owner": None,
        "storage_backend": None,
        "storage_key": None,
        "stored_at": None,
        "updated_at": received_at,
    }
    row.update(media_rows.arrival(event.fault, received_at))
    return row
