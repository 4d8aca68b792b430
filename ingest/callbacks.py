"""Downstream callbacks: an instance's callback URL hears when an item is stored, fails or
expires.

- **Outbox**: :func:`announce` writes one :class:`~ingest.models.CallbackEvent` in the same
  transaction that made the row terminal, with its body frozen then. A state change is never
  announced without having happened, nor lost between the commit and a POST.
- **Delivery**: :mod:`ingest.callback_delivery` claims due events, POSTs them and retries
  with backoff until ``callback_give_up_hours``.
- **Signing**: the Standard Webhooks scheme (``webhook-id``, ``webhook-timestamp``,
  ``webhook-signature: v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body``), with a fresh
  timestamp at each attempt over the exact stored body. The event id is the same at every
  attempt: receivers deduplicate on it.

The body names the item and where to fetch it through the archive API; never its bytes, a
presigned URL, a caption, a filename or a sender.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import secrets
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from ingest import accounts
from ingest.archive import raw_media_path
from ingest.db import row_count
from ingest.models import TERMINAL_STATES, CallbackEvent, Instance, MediaItem, MediaState
from ingest.secrets import SecretBox

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES = 32
# The Standard Webhooks specification's bounds for a secret's decoded length.
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
# Item ids per statement of announce().
ANNOUNCE_CHUNK = 500
# Delivered and failed events are kept this long for `ingest stats` and an operator's look,
# then deleted by the hourly retention task.
FINISHED_EVENTS_KEPT = timedelta(days=7)


class EventType(enum.StrEnum):
    STORED = "media.stored"
    FAILED = "media.failed"
    EXPIRED = "media.expired"


class EventState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


EVENT_FOR_STATE = {
    MediaState.STORED: EventType.STORED,
    MediaState.FAILED: EventType.FAILED,
    MediaState.EXPIRED: EventType.EXPIRED,
}


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def signature_headers(secret: str, event_id: str, body: str, timestamp: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` sent at ``timestamp``."""
    at = timestamp.astimezone(UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(math.floor(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, at, body),
    }


# --- configuration ---------------------------------------------------------------------


def check_url(url: str) -> str:
    """An http(s) URL with a host and no user info; raises :class:`accounts.RegistryError`.

    Where it resolves to is checked at each delivery, where the connection is opened."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise accounts.RegistryError("the callback URL is not a readable URL") from None
    if parts.scheme not in ("http", "https"):
        raise accounts.RegistryError("the callback URL must be http:// or https://")
    if not parts.hostname:
        raise accounts.RegistryError("the callback URL must name a host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise accounts.RegistryError(
            "the callback URL must not carry user info (the signature authenticates us)"
        )
    if parts.fragment or port == 0:
        raise accounts.RegistryError("the callback URL must have no fragment and a real port")
    return url


def check_secret(secret: str) -> str:
    """A Standard Webhooks secret (``whsec_`` + base64 of 24 to 64 bytes)."""
    try:
        raw = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise accounts.RegistryError(
            "the callback secret must be whsec_ followed by base64"
        ) from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise accounts.RegistryError(
            f"the callback secret must decode to {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes"
        )
    return secret


def configure(
    session: Session,
    instance: Instance | str,
    url: str | None,
    secret: str | None,
    box: SecretBox,
) -> str | None:
    """Set the instance's callback URL and signing secret (generated when not given), or,
    with ``url`` None, remove both. Returns the secret, for the CLI to show once.

    Events still pending when the URL is removed have nowhere to go: they become ``failed``.
    A changed URL receives the events still pending, signed with the new secret.
    """
    row = accounts.get_instance(session, instance) if isinstance(instance, str) else instance
    if url is None:
        row.callback_url = None
        row.callback_secret_encrypted = None
        session.execute(
            update(CallbackEvent)
            .where(CallbackEvent.instance_id == row.id)
            .where(CallbackEvent.state == EventState.PENDING)
            .values(
                state=EventState.FAILED,
                last_error="the instance's callback URL was removed",
                lease_until=None,
            )
            .execution_options(synchronize_session=False)
        )
        session.flush()
        return None
    check_url(url)
    chosen = check_secret(secret) if secret is not None else new_secret()
    row.callback_url = url
    row.callback_secret_encrypted = box.encrypt(chosen)
    session.flush()
    return chosen


# --- the outbox --------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _paths(instance: str, message_id: str, stored: bool) -> dict[str, str]:
    query = f"?messageId={quote(message_id, safe='')}"
    name = quote(instance, safe="")
    paths = {"metadata": f"/api/chat/find-message/{name}{query}"}
    if stored:
        # Only a stored item has bytes to fetch.
        paths["base64"] = f"/api/chat/base64/{name}{query}"
        paths["media"] = raw_media_path(instance, message_id)
    return paths


def event_body(event_type: EventType, now: datetime, row: Any) -> str:
    """The JSON sent for one item (Standard Webhooks' ``type``/``timestamp``/``data`` shape).

    ``row`` has the media row's columns and ``instance_name``. Compact, ASCII-only JSON:
    the stored text is exactly the bytes signed and sent."""
    state = str(row.state)
    stored = state == MediaState.STORED
    document = {
        "type": str(event_type),
        "timestamp": _iso(now),
        "data": {
            "instance": row.instance_name,
            "messageId": row.message_id,
            "mediaType": row.media_type,
            "state": state,
            "reason": row.failure_reason,
            "size": row.size if stored else None,
            "sha256": row.actual_sha256 if stored else None,
            "mimeType": (row.actual_mime if stored else None) or row.declared_mime,
            "receivedAt": _iso(row.received_at),
            "storedAt": _iso(row.stored_at) if stored else None,
            "paths": _paths(row.instance_name, row.message_id, stored),
        },
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True)


_ANNOUNCED_COLUMNS = (
    MediaItem.id,
    MediaItem.instance_id,
    Instance.name.label("instance_name"),
    MediaItem.message_id,
    MediaItem.media_type,
    MediaItem.state,
    MediaItem.failure_reason,
    MediaItem.size,
    MediaItem.actual_sha256,
    MediaItem.actual_mime,
    MediaItem.declared_mime,
    MediaItem.received_at,
    MediaItem.stored_at,
)


def announce(session: Session | Connection, item_ids: Iterable[int], now: datetime) -> int:
    """In the caller's transaction, one event for each of these rows that is stored, failed
    or expired and whose instance has a callback URL. Returns how many were written.

    Call it right after the statement that made the rows terminal, in the same transaction
    (the outbox); it reads the rows as that statement left them. One SELECT per 500 ids, and
    nothing more when no instance has a callback URL."""
    ids = sorted(set(item_ids))
    written = 0
    for start in range(0, len(ids), ANNOUNCE_CHUNK):
        rows = session.execute(
            select(*_ANNOUNCED_COLUMNS)
            .join(Instance, Instance.id == MediaItem.instance_id)
            .where(MediaItem.id.in_(ids[start : start + ANNOUNCE_CHUNK]))
            .where(MediaItem.state.in_([state.value for state in TERMINAL_STATES]))
            .where(Instance.callback_url.is_not(None))
        ).all()
        if not rows:
            continue
        events = []
        for row in rows:
            event_type = EVENT_FOR_STATE[MediaState(row.state)]
            events.append(
                {
                    "event_id": new_event_id(),
                    "instance_id": row.instance_id,
                    "media_item_id": row.id,
                    "event_type": event_type.value,
                    "body": event_body(event_type, now, row),
                    "state": EventState.PENDING.value,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "lease_until": None,
                    "created_at": now,
                }
            )
        session.execute(insert(CallbackEvent), events)
        written += len(events)
    return written


# --- pruning -----------------------------------------------------------------------------


def prune(session: Session, now: datetime, keep: timedelta = FINISHED_EVENTS_KEPT) -> int:
    """Delete delivered and failed events older than ``keep``: the outbox is not an archive.
    Pending ones stay whatever their age (they give up on their own after a day)."""
    result = session.execute(
        delete(CallbackEvent)
        .where(CallbackEvent.state.in_([EventState.DELIVERED, EventState.FAILED]))
        .where(CallbackEvent.created_at < now - keep)
        .execution_options(synchronize_session=False)
    )
    return row_count(result)
