"""The archive lookup rules (seed ``media-as-base64-api.md``), free of any web framework.

Who may see what, which error wins when several apply, and how a stored object becomes a
stream of base64 chunks. ``webhook/archive.py`` only translates HTTP to these calls.

Order of checks, when several fail: missing instance name or ``messageId`` (400), then the
token (401), then the instance (404), then its connection (503), then the message (404).
The connection matters only for media not yet stored: what is stored is served whatever the
instance's state, since the archive exists to outlive the provider (a provider 401 marks an
instance disconnected, and must not hide what was archived before it).
A token must be valid before we say whether an instance exists: an instance token answers
401 for every other name, known or not; an account token answers 404 for every name outside
its account, known or not, so no token learns the names of instances it cannot reach.
A name or ``messageId`` with a control character is one nobody registered or received: it
takes the same places in that order, but never reaches the database.

Why one module of this size: the order in which the checks run is itself the contract (which
error wins). Kept together, that order reads from top to bottom; the base64 framing at the end
is the other half of the same answer.
"""

from __future__ import annotations

import binascii
import hmac
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO
from urllib.parse import quote

from sqlalchemy import ColumnElement, and_, false, select
from sqlalchemy.orm import Session

from ingest.accounts import hash_secret
from ingest.events import has_control_character
from ingest.models import ApiToken, Instance, MediaItem, MediaState
from ingest.storage import StorageIntegrityError

INSTANCE_REQUIRED = "Instance name is required"
MESSAGE_ID_REQUIRED = "messageId query parameter is required"
INVALID_TOKEN = "Invalid token"  # noqa: S105 - an error message, not a secret
INSTANCE_NOT_FOUND = "Instance not found"
NOT_CONNECTED = "Instance is not connected to WhatsApp"
NO_MEDIA = "Message not found or no media available"
TOO_MANY_REQUESTS = "Too many requests"
TOO_MANY_FAILURES = "Too many failed authentications"
BASE64_OK = "Base64 retrieved successfully"
ACCOUNT_TOKEN_REQUIRED = "Erasure needs an account token"  # noqa: S105 - a message
ERASED = "Media erased"
FOUND = "Message found"

DEFAULT_MIME = "application/octet-stream"
# Raw bytes per encoded chunk: a multiple of 3, so chunks encode without padding and simply
# concatenate. 768 KiB in, 1 MiB out: large enough to run at b64encode speed, small enough
# that a 100 MB document costs a few MB of memory.
B64_CHUNK_BYTES = 3 * 256 * 1024

_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
_FILENAME_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\/:*?<>|;]')


class ArchiveError(Exception):
    """A lookup ends with this status and message (the seed's error table, and a few more)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class TokenNotFound(ArchiveError):
    """The 401 of a token that does not exist: a failed authentication, which the caller
    counts against the client (an instance token used on another instance is a 401 too, but
    by a real token, and its own rate limit bounds it)."""

    def __init__(self) -> None:
        super().__init__(401, INVALID_TOKEN)


@dataclass(frozen=True)
class MediaRecord:
    """What the API may say about one media row; a plain value, usable after the session."""

    instance: str
    message_id: str
    media_type: str
    state: str
    failure_reason: str | None
    declared_mime: str | None
    actual_mime: str | None
    declared_sha256: str | None
    actual_sha256: str | None
    declared_size: int | None
    size: int | None
    filename: str | None
    caption: str | None
    sender: str | None
    voice: bool
    animated: bool
    over_send_limit: bool
    message_timestamp: datetime | None
    received_at: datetime | None
    stored_at: datetime | None
    expires_at: datetime | None
    attempts: int
    storage_key: str | None
    removed_at: datetime | None = None
    removed_by: str | None = None

    @classmethod
    def of(cls, item: MediaItem, instance: Instance) -> MediaRecord:
        return cls(
            instance=instance.name,
            message_id=item.message_id,
            media_type=item.media_type,
            state=item.state,
            failure_reason=item.failure_reason,
            declared_mime=item.declared_mime,
            actual_mime=item.actual_mime,
            declared_sha256=item.declared_sha256,
            actual_sha256=item.actual_sha256,
            declared_size=item.declared_size,
            size=item.size,
            filename=item.filename,
            caption=item.caption,
            sender=item.sender,
            voice=bool(item.voice),
            animated=bool(item.animated),
            over_send_limit=bool(item.over_send_limit),
            message_timestamp=item.message_timestamp,
            received_at=item.received_at,
            stored_at=item.stored_at,
            expires_at=item.expires_at,
            attempts=item.attempts or 0,
            storage_key=item.storage_key,
            removed_at=item.removed_at,
            removed_by=item.removed_by,
        )

    @property
    def available(self) -> bool:
        """Bytes can be served: stored, with a key and a known size."""
        return self.state == MediaState.STORED and bool(self.storage_key) and self.size is not None

    @property
    def mime_type(self) -> str:
        """The sniffed type, else the declared one; anything malformed becomes octet-stream."""
        for candidate in (self.actual_mime, self.declared_mime):
            if candidate and _MIME.match(candidate.split(";", 1)[0].strip()):
                return candidate.strip()
        return DEFAULT_MIME

    @property
    def sha256(self) -> str | None:
        return self.actual_sha256 or None


# --- the checks, in order -------------------------------------------------------------


def presented_token(token_header: str | None, authorization: str | None) -> str | None:
    """The ``token`` header, else ``Authorization``: ``Bearer <t>``, or the bare token.

    The seed lets ``Authorization`` stand in for ``token``, whose example value is the bare
    token, so a value without a space is the token itself. Any other scheme, or ``Bearer``
    with nothing after it, presents no token (None).
    """
    token = (token_header or "").strip()
    if token:
        return token
    parts = (authorization or "").split(maxsplit=1)
    if not parts:
        return None
    if parts[0].lower() == "bearer":
        return parts[1].strip() if len(parts) == 2 else None
    return parts[0] if len(parts) == 1 else None


def token_key(token: str) -> str:
    """What rate limits and logs may use to tell tokens apart: the hash, never the token."""
    return hash_secret(token)


def require_parameters(instance_name: str | None, message_id: str | None) -> tuple[str, str]:
    name = (instance_name or "").strip()
    if not name:
        raise ArchiveError(400, INSTANCE_REQUIRED)
    message = (message_id or "").strip()
    if not message:
        raise ArchiveError(400, MESSAGE_ID_REQUIRED)
    return name, message


def find_record(
    session: Session, token: str | None, instance_name: str | None, message_id: str | None
) -> MediaRecord:
    """Every check up to the message row; the row may be in any state.

    One round trip: the token, the instance and the message come back from a single query,
    and the decisions are made here, in the documented order.
    """
    instance, item = _check_reach(_find(session, token, instance_name, message_id))
    record = None if item is None else MediaRecord.of(item, instance)
    if not instance.connected and (record is None or not record.available):
        raise ArchiveError(503, NOT_CONNECTED)
    if record is None:
        raise ArchiveError(404, NO_MEDIA)
    return record


_Found = tuple[ApiToken, Instance | None, MediaItem | None]


def _find(
    session: Session, token: str | None, instance_name: str | None, message_id: str | None
) -> _Found:
    """The parameters' check (400), then the token with its instance and message rows."""
    name, message = require_parameters(instance_name, message_id)
    # Checked on the values as sent: strip() also removes some control characters.
    return _lookup(
        session,
        token,
        name,
        message,
        name_known=_printable(instance_name),
        message_known=_printable(message_id),
    )


def _printable(value: str | None) -> bool:
    # A control character comes only from a crafted URL; PostgreSQL would refuse a NUL (a
    # 500) where the seed's answer is a 404.
    return value is None or not has_control_character(value)


def _lookup(
    session: Session,
    token: str | None,
    instance_name: str,
    message_id: str,
    *,
    name_known: bool = True,
    message_known: bool = True,
) -> _Found:
    """The token's row, with the instance and message rows or None for each.

    ``name_known``/``message_known`` False: the value cannot name a row, so the join matches
    nothing without sending the value; the token is still checked, and the checks keep
    their order.
    """
    if not token:
        raise ArchiveError(401, INVALID_TOKEN)
    digest = hash_secret(token)
    instance_on: ColumnElement[bool] = Instance.name == instance_name if name_known else false()
    message_on: ColumnElement[bool] = (
        and_(MediaItem.instance_id == Instance.id, MediaItem.message_id == message_id)
        if message_known
        else false()
    )
    query = (
        select(ApiToken, Instance, MediaItem)
        .select_from(ApiToken)
        .outerjoin(Instance, instance_on)
        .outerjoin(MediaItem, message_on)
        .where(ApiToken.token_hash == digest)
    )
    row: Sequence[Any] | None = session.execute(query).first()
    if row is None or not hmac.compare_digest(row[0].token_hash, digest):
        raise TokenNotFound
    return row[0], row[1], row[2]


def _check_reach(found: _Found) -> tuple[Instance, MediaItem | None]:
    token, instance, item = found
    if token.instance_id is not None:
        # An instance token says nothing about any other name, known or not.
        if instance is None or instance.id != token.instance_id:
            raise ArchiveError(401, INVALID_TOKEN)
    elif instance is None or instance.account_id != token.account_id:
        # An account token sees its own account only; another account's instance is as
        # unknown to it as a name nobody registered.
        raise ArchiveError(404, INSTANCE_NOT_FOUND)
    return instance, item


def authorize_erasure(
    session: Session, token: str | None, instance_name: str | None, message_id: str | None
) -> tuple[int, str, str]:
    """The checks of an erasure request: ``(instance id, message id, who)``, or the error.

    Same order as a lookup, with one more rule after the token: only an account token may
    erase (403 for an instance token, whatever the name). ``who`` names the token by its
    label, or its id, for the row's audit; never by its value.
    """
    found = _find(session, token, instance_name, message_id)
    api_token = found[0]
    if api_token.account_id is None:
        raise ArchiveError(403, ACCOUNT_TOKEN_REQUIRED)
    instance, item = _check_reach(found)
    if item is None:
        raise ArchiveError(404, NO_MEDIA)
    who = f"token {api_token.id}" + (f" ({api_token.label})" if api_token.label else "")
    return instance.id, item.message_id, who


def require_available(record: MediaRecord) -> MediaRecord:
    """Only stored media has bytes; pending, downloading, failed, expired, purged or erased
    rows are a 404."""
    if not record.available:
        raise ArchiveError(404, NO_MEDIA)
    return record


def check_base64_size(record: MediaRecord, max_bytes: int, raw_path: str) -> None:
    """Past ``max_bytes`` the JSON route refuses (413) and names the raw one instead."""
    assert record.size is not None
    if record.size > max_bytes:
        raise ArchiveError(
            413,
            f"Media is {record.size} bytes, over the base64 limit of {max_bytes} bytes; "
            f"download the raw bytes from {raw_path}",
        )


# RFC 9110 section 14.1.1: int-range ("first-last", "first-") or suffix-range ("-length").
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
_OWS = " \t"

ByteRange = tuple[int | None, int | None]


def parse_byte_ranges(header: str) -> list[ByteRange] | None:
    """The range-set of a ``Range: bytes=...`` header (RFC 9110 section 14.2), or None when
    the header is not a valid one, which the server then ignores (a 200).

    Each range is ``(first, last)`` (``last`` None: to the end), or ``(None, length)`` for a
    suffix. Written here rather than taken from werkzeug, which refuses the valid
    ``bytes=-0`` (a suffix of no bytes) as if it were malformed: that range can never be
    satisfied, so its answer is a 416, not the whole object.
    """
    unit, equals, range_set = header.partition("=")
    # Range units compare case-insensitively; no whitespace around "=" (RFC 9110 14.2).
    if not equals or unit.lower() != "bytes":
        return None
    ranges: list[ByteRange] = []
    for element in range_set.split(","):
        element = element.strip(_OWS)
        if not element:
            continue  # empty list elements are allowed (RFC 9110 section 5.6.1.2)
        match = _RANGE_SPEC.fullmatch(element)
        if match is None:
            return None
        first, last = match.group(1), match.group(2)
        if first:
            if last and int(last) < int(first):
                return None
            ranges.append((int(first), int(last) if last else None))
        elif last:
            ranges.append((None, int(last)))
        else:
            return None
    return ranges or None


def range_bounds(byte_range: ByteRange, size: int) -> tuple[int, int] | None:
    """``[start, stop)`` of ``byte_range`` in an object of ``size`` bytes, or None when the
    range cannot be satisfied (starts at or past the end, or a suffix of no bytes)."""
    first, last = byte_range
    if first is None:
        assert last is not None
        if last == 0 or size == 0:
            return None
        return max(0, size - last), size
    if first >= size:
        return None
    return first, size if last is None else min(last + 1, size)


def raw_media_path(instance_name: str, message_id: str) -> str:
    return f"/api/chat/media/{quote(instance_name, safe='')}?messageId={quote(message_id, safe='')}"


# --- the bodies -----------------------------------------------------------------------


def base64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)


def b64_chunks(stream: BinaryIO, size: int, chunk_bytes: int = B64_CHUNK_BYTES) -> Iterator[bytes]:
    """Encode exactly ``size`` bytes of ``stream`` as base64, one bounded chunk at a time.

    Every chunk but the last covers a multiple of 3 bytes, so the chunks concatenate into
    one valid encoding. A stream that ends early raises :class:`StorageIntegrityError`: the
    caller has promised a length and must not finish the body as if it were whole.
    """
    if chunk_bytes <= 0 or chunk_bytes % 3:
        raise ValueError("chunk_bytes must be a positive multiple of 3")
    remaining = size
    carry = b""
    while remaining > 0:
        data = stream.read(min(chunk_bytes, remaining))
        if not data:
            raise StorageIntegrityError(f"stored object ended {remaining} bytes early")
        remaining -= len(data)
        if carry:
            data = carry + data
        usable = len(data) if remaining == 0 else len(data) - len(data) % 3
        carry = data[usable:]
        if usable:
            yield binascii.b2a_base64(memoryview(data)[:usable], newline=False)


@dataclass(frozen=True)
class Base64Envelope:
    """The success body around the base64 text, so the text itself can be streamed."""

    prefix: bytes
    suffix: bytes
    content_length: int


def base64_envelope(record: MediaRecord) -> Base64Envelope:
    assert record.size is not None
    head = {
        "success": True,
        "message": BASE64_OK,
        "message_id": record.message_id,
        "mime_type": record.mime_type,
        "media_type": record.media_type,
        "base64": "",
    }
    text = json.dumps(head, ensure_ascii=True, separators=(",", ":"))
    # The document ends with `"base64":""}`; split it between the two quotes.
    cut = len(text) - 2
    prefix, suffix = text[:cut].encode(), text[cut:].encode()
    return Base64Envelope(
        prefix=prefix,
        suffix=suffix,
        content_length=len(prefix) + base64_length(record.size) + len(suffix),
    )


def metadata(record: MediaRecord) -> dict[str, Any]:
    """The find-message body: everything about the row except where it is stored."""

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "success": True,
        "message": FOUND,
        "instance": record.instance,
        "message_id": record.message_id,
        "state": record.state,
        "available": record.available,
        "failure_reason": record.failure_reason,
        "media_type": record.media_type,
        "mime_type": record.mime_type,
        "declared_mime": record.declared_mime,
        "sniffed_mime": record.actual_mime,
        "size": record.size,
        "declared_size": record.declared_size,
        "sha256": record.actual_sha256,
        "declared_sha256": record.declared_sha256,
        "filename": record.filename,
        "caption": record.caption,
        "sender": record.sender,
        "voice": record.voice,
        "animated": record.animated,
        "over_send_limit": record.over_send_limit,
        "message_timestamp": when(record.message_timestamp),
        "received_at": when(record.received_at),
        "stored_at": when(record.stored_at),
        "expires_at": when(record.expires_at),
        "attempts": record.attempts,
        # Purged (retention) or erased: when the bytes went and on whose word.
        "removed_at": when(record.removed_at),
        "removed_by": record.removed_by,
    }


def etag(record: MediaRecord, representation: str) -> str | None:
    """A strong validator per representation (raw bytes and the base64 document differ)."""
    if not record.sha256:
        return None
    return record.sha256 if representation == "raw" else f"{representation}-{record.sha256}"


def download_filename(record: MediaRecord, extension: str | None) -> str:
    """The provider's filename made safe for a header, else one built from the message id."""
    name = _FILENAME_UNSAFE.sub("_", record.filename or "").strip(" .")
    if name:
        return name[:200]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", record.message_id)[:100] or "media"
    return base + (extension or "")


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback and the exact (UTF-8) name per RFC 6266/5987."""
    fallback = filename.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
