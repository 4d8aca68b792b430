"""The webhook body, read into typed records: a pure function of the bytes, no I/O.

Shape (Meta Cloud API; 360dialog forwards the same envelope)::

    {"object": "whatsapp_business_account",
     "entry": [{"id": ..., "changes": [{"field": "messages", "value": {
         "metadata": {"phone_number_id": ...},
         "contacts": [...], "statuses": [...], "errors": [...],
         "messages": [{"id": wamid, "from": ..., "timestamp": ..., "type": "image",
                       "image": {"id", "mime_type", "sha256", "caption"?, "url"?},
                       "errors"?: [{"code", "title", ...}]}]}}]}]}

Only media messages (and provider errors about media) become records; statuses, text and
other messages are counted and ignored. The structure we depend on is checked strictly: a body
we cannot read is a :class:`PayloadError` (the receiver answers 400, which the provider will
not fix by retrying), never an exception of another kind. A media id must be a provider media
id (:func:`is_media_id`); a media URL that is not in the CDN's attachment form
(:func:`is_attachment_url`) is dropped, counted, and the worker resolves the media id instead.
A body naming more than ``max_items`` phone number ids or media items is
:class:`TooManyItems`, raised as soon as the count passes, before anything else is read.

Why one module of this size: one wire format, one pure parser. Most of its length is the
strict check of each field the service depends on, each of which a provider can get wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ingest.media_rules import normalize_sha256
from ingest.models import MediaType

ENVELOPE_OBJECT = "whatsapp_business_account"

# Column widths of media_items: longer values would fail at INSERT time (a 500), so they are
# refused here (a 400).
MAX_ID_CHARS = 255
MAX_MIME_CHARS = 255
MAX_SENDER_CHARS = 64
MAX_ERROR_TITLE_CHARS = 500

# Error texts that mean "the file is over the provider's size limit". Meta documents no
# dedicated code for an inbound file over 100 MB (the code seen is the generic one for an
# unsupported message), so the title/details decide; anything else is "provider_error".
_TOO_LARGE_TEXT = re.compile(r"too (large|big)|exceeds?\b.*\bsize|size\b.*\b(limit|exceed)", re.I)

_MEDIA_TYPES = {member.value: member for member in MediaType}

# Meta's media ids are decimal (the lookup is ``GET /<version>/<media-id>``, and the CDN URL
# repeats the id as ``mid=130345565692730173924``: provider-media-constraints.md); 360dialog
# forwards Meta's. Anything else (``..``, a slash, a query) could steer a lookup, which carries
# the instance's credential, to another path of the provider's API.
_MEDIA_ID = re.compile(r"[0-9]{1,64}")

# The path of a direct-download URL: Meta's lookaside form
# (``https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=..&ext=..&hash=..``),
# which 360dialog serves under its own host (provider-media-constraints.md, "Download Media").
CDN_ATTACHMENT_PATH = "/whatsapp_business/attachments/"
# Characters RFC 3986 allows in a URL. Anything else (spaces, backslashes, non-ASCII) is
# read differently by different URL parsers, so the URL we check might not be the one fetched.
_URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_ESCAPED_SLASH = re.compile(r"\\+/")


class PayloadError(ValueError):
    """The body is not a webhook we can read. The message is safe to return to the caller."""


class TooManyItems(PayloadError):
    """The body names more phone number ids or media items than one webhook may."""


def is_media_id(value: str) -> bool:
    """A provider media id: decimal digits, nothing that could be read as a path."""
    return _MEDIA_ID.fullmatch(value) is not None


def unescape_slashes(url: str) -> str:
    """Undo JSON-escaped slashes (``https:\\/\\/``, also doubled), as 360dialog sends them."""
    return _ESCAPED_SLASH.sub("/", url.strip())


def is_attachment_url(url: str, *, base_path: str = "") -> bool:
    """Is ``url`` a CDN attachment URL: http(s), a host, no user info or fragment, the path
    ``<base_path>/whatsapp_business/attachments/`` exactly (raw: no dot segments, no escapes),
    and a query naming exactly one media id as ``mid``?

    ``base_path`` is the path of a provider base the CDN is served under (360dialog's rewrite
    onto a base URL with a path, as the sandbox's ``/d360``). The host is the caller's (and the
    allowlist's) business.
    """
    url = unescape_slashes(url)
    if not _URL_CHARACTERS.fullmatch(url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return False
    if parts.fragment or parts.path != base_path.rstrip("/") + CDN_ATTACHMENT_PATH:
        return False
    media_ids = [
        value for key, value in parse_qsl(parts.query, keep_blank_values=True) if key == "mid"
    ]
    return len(media_ids) == 1 and is_media_id(media_ids[0])


@dataclass(frozen=True)
class ProviderFault:
    """An error the provider reported instead of (or about) a media item."""

    code: int | None
    title: str
    details: str | None = None

    @property
    def reason(self) -> str:
        """Our failure_reason code for a row that carries this fault."""
        text = f"{self.title} {self.details or ''}"
        return "too_large" if _TOO_LARGE_TEXT.search(text) else "provider_error"

    def describe(self) -> str:
        """``"<code>: <title>"``, as stored in ``media_items.last_error``."""
        code = "?" if self.code is None else str(self.code)
        return f"{code}: {self.title}"


@dataclass(frozen=True)
class MediaEvent:
    """One inbound media message (or a provider error in its place).

    ``url`` is the signed direct-download URL: confidential, so it is kept out of ``repr``.
    ``phone_number_id`` is None when the change named none (the per-instance URL still routes
    it). ``fault`` set means the provider could not deliver the media: the row is recorded as
    failed and never downloaded.
    """

    phone_number_id: str | None
    message_id: str
    media_type: MediaType
    media_id: str | None = None
    mime_type: str | None = None
    sha256: str | None = None  # lowercase hex, whatever encoding the provider used
    caption: str | None = None
    filename: str | None = None
    sender: str | None = None
    timestamp: datetime | None = None
    file_size: int | None = None
    voice: bool = False
    animated: bool = False
    url: str | None = field(default=None, repr=False)
    fault: ProviderFault | None = None


@dataclass(frozen=True)
class ParsedWebhook:
    media: tuple[MediaEvent, ...]
    # Every phone number id the body names, in order of first appearance (for routing).
    phone_number_ids: tuple[str, ...]
    # Messages and statuses acknowledged without a record (text, reactions, read receipts...).
    ignored: int
    # Errors the provider reported for a change that carried no message to attach them to.
    unattached_faults: tuple[ProviderFault, ...]
    # Media URLs dropped for not being CDN attachment URLs (their media ids are resolved).
    dropped_urls: int = 0


def parse_body(raw: bytes, *, max_items: int | None = None) -> ParsedWebhook:
    """Decode and parse a webhook body. Raises :class:`PayloadError` for anything unreadable."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        # ValueError covers undecodable bytes, bad syntax and an integer too long to convert
        # (Python's limit on int digits); RecursionError, nesting too deep.
        raise PayloadError("Malformed JSON") from None
    return parse_payload(document, max_items=max_items)


def parse_payload(document: Any, *, max_items: int | None = None) -> ParsedWebhook:
    """Parse an already decoded body (see the module docstring for the shape).

    ``max_items`` bounds the distinct phone number ids and, separately, the media items: each
    id is a database lookup and each item a row, and both are counted before either happens.
    """
    envelope = _object(document, "body")
    kind = envelope.get("object")
    if kind is not None and kind != ENVELOPE_OBJECT:
        raise PayloadError(f"Unsupported webhook object (expected {ENVELOPE_OBJECT!r})")
    counts = _Counts(max_items)
    media: list[MediaEvent] = []
    phone_ids: dict[str, None] = {}
    ignored = 0
    unattached: list[ProviderFault] = []
    for entry in _list(envelope.get("entry"), "entry", required=True):
        entry_obj = _object(entry, "entry[]")
        for change in _list(entry_obj.get("changes"), "entry[].changes"):
            change_obj = _object(change, "changes[]")
            field_name = change_obj.get("field")
            if field_name is not None and field_name != "messages":
                # Account, template and other notifications: nothing to archive.
                ignored += 1
                continue
            value = _object(change_obj.get("value"), "changes[].value")
            phone_id = _phone_number_id(value)
            if phone_id is not None and phone_id not in phone_ids:
                phone_ids[phone_id] = None
                counts.check(len(phone_ids), "phone number ids")
            skipped, faults = _parse_value(value, phone_id, media, counts)
            ignored += skipped
            unattached.extend(faults)
    return ParsedWebhook(
        media=tuple(media),
        phone_number_ids=tuple(phone_ids),
        ignored=ignored,
        unattached_faults=tuple(unattached),
        dropped_urls=counts.dropped_urls,
    )


class _Counts:
    """What one parse has counted: against the body's bound, and what it dropped."""

    def __init__(self, max_items: int | None) -> None:
        self.max_items = max_items
        self.dropped_urls = 0

    def check(self, count: int, what: str) -> None:
        if self.max_items is not None and count > self.max_items:
            raise TooManyItems(f"Payload names more than {self.max_items} {what}")


def _parse_value(
    value: Mapping[str, Any], phone_id: str | None, media: list[MediaEvent], counts: _Counts
) -> tuple[int, list[ProviderFault]]:
    """Append the change's media events to ``media``; the ignored count and loose faults."""
    ignored = len(_list(value.get("statuses"), "value.statuses"))
    for contact in _list(value.get("contacts"), "value.contacts"):
        _object(contact, "contacts[]")
    change_faults = [_fault(item) for item in _list(value.get("errors"), "value.errors")]
    messages = _list(value.get("messages"), "value.messages")

    for message in messages:
        event = _media_event(_object(message, "messages[]"), phone_id, change_faults, counts)
        if event is None:
            ignored += 1
        else:
            media.append(event)
            counts.check(len(media), "media items")
    # value.errors with no message to attach them to cannot make a row (no message id): the
    # caller logs them.
    unattached = change_faults if not messages else []
    return ignored, unattached


def _media_event(
    message: Mapping[str, Any],
    phone_id: str | None,
    change_faults: list[ProviderFault],
    counts: _Counts,
) -> MediaEvent | None:
    kind = message.get("type")
    if not isinstance(kind, str):
        raise PayloadError("messages[].type must be a string")
    own_faults = [_fault(item) for item in _list(message.get("errors"), "messages[].errors")]
    faults = own_faults or change_faults

    media_type = _MEDIA_TYPES.get(kind)
    if media_type is None and kind == "unsupported":
        # The provider could not deliver a message; it is ours only if it was media.
        unsupported = message.get("unsupported")
        inner = unsupported.get("type") if isinstance(unsupported, Mapping) else None
        media_type = _MEDIA_TYPES.get(inner) if isinstance(inner, str) else None
        if media_type is not None and not faults:
            faults = [ProviderFault(code=None, title="Unsupported media message")]
    if media_type is None:
        return None

    message_id = _identifier(message.get("id"), "messages[].id", required=True)
    assert message_id is not None
    common: dict[str, Any] = {
        "phone_number_id": phone_id,
        "message_id": message_id,
        "media_type": media_type,
        "sender": _identifier(message.get("from"), "messages[].from", limit=MAX_SENDER_CHARS),
        "timestamp": _timestamp(message.get("timestamp")),
    }
    body = message.get(kind)
    if body is None and faults:
        return MediaEvent(**common, fault=faults[0])
    media = _object(body, f"messages[].{kind}")
    url = _url(media.get("url"), f"{kind}.url")
    if url is not None and not is_attachment_url(url):
        # Not a CDN attachment URL (another path of an allowed host, a local port): never
        # fetched; the worker resolves the media id instead. The receiver logs the count.
        counts.dropped_urls += 1
        url = None
    details: dict[str, Any] = {
        "media_id": _media_id(media.get("id"), f"{kind}.id", required=not faults),
        "mime_type": _identifier(media.get("mime_type"), f"{kind}.mime_type", MAX_MIME_CHARS),
        "sha256": _sha256(media.get("sha256"), f"{kind}.sha256"),
        "caption": _free_text(media.get("caption"), f"{kind}.caption"),
        "filename": _free_text(media.get("filename"), f"{kind}.filename"),
        "file_size": _size(media.get("file_size"), f"{kind}.file_size"),
        "voice": media.get("voice") is True,
        "animated": media.get("animated") is True,
        "url": url,
    }
    return MediaEvent(**common, **details, fault=faults[0] if faults else None)


# --- field readers: each returns a clean value or raises PayloadError -------------------


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{where} must be an object")
    return value


def _list(value: Any, where: str, *, required: bool = False) -> list[Any]:
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise PayloadError(f"{where} must be a list")
    return value


def _phone_number_id(value: Mapping[str, Any]) -> str | None:
    metadata = value.get("metadata")
    if metadata is None:
        return None
    raw = _object(metadata, "value.metadata").get("phone_number_id")
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    return _identifier(raw, "metadata.phone_number_id")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode's "Cc" category, exactly


def has_control_character(text: str) -> bool:
    """Ids and instance names are printable: one with a control character names nothing.

    Also what keeps such text from PostgreSQL, which refuses a NUL in any text parameter.
    """
    return _CONTROL.search(text) is not None


def _clean(value: str) -> bool:
    """True when the text can be stored as-is on every backend (no NUL, no lone surrogate)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _identifier(
    value: Any, where: str, limit: int = MAX_ID_CHARS, *, required: bool = False
) -> str | None:
    if value is None:
        if required:
            raise PayloadError(f"{where} is required")
        return None
    if not isinstance(value, str) or not _clean(value):
        raise PayloadError(f"{where} must be a string")
    if has_control_character(value):
        # Ids are printable; one with a control character could be stored but never looked
        # up again through the archive API, which refuses such ids.
        raise PayloadError(f"{where} contains a control character")
    if not value.strip():
        if required:
            raise PayloadError(f"{where} is required")
        return None
    if len(value) > limit:
        raise PayloadError(f"{where} is longer than {limit} characters")
    return value


def _media_id(value: Any, where: str, *, required: bool) -> str | None:
    media_id = _identifier(value, where, required=required)
    if media_id is not None and not is_media_id(media_id):
        raise PayloadError(f"{where} is not a media id (digits)")
    return media_id


def _free_text(value: Any, where: str) -> str | None:
    """Captions and filenames are user text: repaired rather than refused, so one odd
    character never makes the provider retry (and us miss) a whole batch."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{where} must be a string")
    return _repair(value)


def _repair(value: str) -> str:
    if _clean(value):
        return value
    return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _url(value: Any, where: str) -> str | None:
    # Stored as given: 360dialog's may still carry escaped slashes, which the worker undoes,
    # and the worker checks the host and port against the allowlist before any request.
    return _identifier(value, where, limit=8192)


def _sha256(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{where} must be a string")
    # An unreadable checksum is dropped, not fatal: the lookup's sha256 still guards the bytes.
    return normalize_sha256(value) if _clean(value) else None


def _size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = _decimal(value, max_digits=18)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise PayloadError(f"{where} must be a non-negative integer")
    return value


def _decimal(value: str, *, max_digits: int) -> int | None:
    """Plain ASCII digits as an int, else None. ``str.isdigit`` is no test: it accepts "²",
    which ``int`` refuses."""
    if value.isascii() and value.isdecimal() and len(value) <= max_digits:
        return int(value)
    return None


def _timestamp(value: Any) -> datetime | None:
    """Unix seconds, as a string (Meta) or a number. Unreadable means unknown, not fatal."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = _decimal(value, max_digits=12)
    if not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _fault(item: Any) -> ProviderFault:
    error = _object(item, "errors[]")
    code = error.get("code")
    if isinstance(code, str):
        code = _decimal(code, max_digits=12)
    if not isinstance(code, int) or isinstance(code, bool) or abs(code) >= 2**31:
        code = None
    title = error.get("title") or error.get("message")
    if not isinstance(title, str) or not title.strip():
        title = "Unknown provider error"
    error_data = error.get("error_data")
    details = error_data.get("details") if isinstance(error_data, Mapping) else None
    return ProviderFault(
        code=code,
        title=_repair(title)[:MAX_ERROR_TITLE_CHARS],
        details=_repair(details) if isinstance(details, str) else None,
    )
