"""Webhook bodies as Meta's Cloud API (and 360dialog, which forwards the same envelope) sends
them, and their ``X-Hub-Signature-256``. Pure functions: tests, ``ingest demo`` and bench/.

    message = media_message("image", media.media_id, sha256=media.sha256, url=media.url)
    body = encode(webhook(phone_number_id, messages=[message]))
    headers = {"X-Hub-Signature-256": sign(body, app_secret)}

``sign`` is the receiver's own (:func:`ingest.intake.sign`), so the two cannot drift apart.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from ingest.intake import sign as sign
from sandbox.provider import SandboxMedia

MEDIA_TYPES = ("image", "video", "audio", "document", "sticker")
DEFAULT_SENDER = "15551234567"
# Meta's text for an inbound file over its 100 MB limit (code 131052 is "media download
# error"; the details say why).
TOO_LARGE_ERROR = {
    "code": 131052,
    "title": "Media download error",
    "message": "Media download error",
    "error_data": {"details": "Media file size too big. Max file size we currently support: 100MB"},
}


def wamid() -> str:
    return "wamid.SANDBOX" + uuid.uuid4().hex.upper()


def media_message(
    media_type: str,
    media_id: str,
    *,
    mime_type: str = "application/octet-stream",
    sha256: str | None = None,
    url: str | None = None,
    message_id: str | None = None,
    sender: str = DEFAULT_SENDER,
    timestamp: int | None = None,
    caption: str | None = None,
    filename: str | None = None,
    voice: bool | None = None,
    animated: bool | None = None,
) -> dict[str, Any]:
    """One inbound media message; ``url`` is the direct-download URL (omit for old-style)."""
    if media_type not in MEDIA_TYPES:
        raise ValueError(f"not a media type: {media_type!r}")
    media: dict[str, Any] = {"id": media_id, "mime_type": mime_type}
    if sha256 is not None:
        media["sha256"] = sha256
    if url is not None:
        media["url"] = url
    if caption is not None:
        media["caption"] = caption
    if filename is not None:
        media["filename"] = filename
    if voice is not None:
        media["voice"] = voice
    if animated is not None:
        media["animated"] = animated
    return {
        "from": sender,
        "id": message_id or wamid(),
        "timestamp": str(timestamp if timestamp is not None else int(time.time())),
        "type": media_type,
        media_type: media,
    }


def message_for(
    media: SandboxMedia,
    *,
    sha256_format: str = "hex",
    with_url: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The media message for an item the sandbox serves (sha256 as ``hex`` or ``base64``)."""
    extra.setdefault("mime_type", media.mime_type)
    if media.media_type == "document":
        extra.setdefault("filename", f"{media.media_id}.pdf")
    return media_message(
        media.media_type,
        media.media_id,
        sha256=media.sha256_b64 if sha256_format == "base64" else media.sha256,
        url=media.url if with_url else None,
        **extra,
    )


def varied_message(media: SandboxMedia, message_id: str, sender: str, n: int) -> dict[str, Any]:
    """The ``n``-th message of a run for ``media``, varied the ways real ones vary (sha256 as
    hex or base64, captions with non-ASCII text, voice notes)."""
    kind = media.media_type
    return message_for(
        media,
        sha256_format="base64" if n % 2 else "hex",
        message_id=message_id,
        sender=sender,
        caption=f"demo {kind} {n} ✓" if kind in ("image", "video", "document") else None,
        filename=f"demo-{n}.pdf" if kind == "document" else None,
        voice=n % 3 == 0 if kind == "audio" else None,
        animated=False if kind == "sticker" else None,
    )


def text_message(body: str, *, sender: str = DEFAULT_SENDER) -> dict[str, Any]:
    return {
        "from": sender,
        "id": wamid(),
        "timestamp": str(int(time.time())),
        "type": "text",
        "text": {"body": body},
    }


def error_message(
    media_type: str = "document",
    error: dict[str, Any] | None = None,
    *,
    sender: str = DEFAULT_SENDER,
) -> dict[str, Any]:
    """A media message the provider could not deliver (by default: a file over 100 MB)."""
    return {
        "from": sender,
        "id": wamid(),
        "timestamp": str(int(time.time())),
        "type": "unsupported",
        "unsupported": {"type": media_type},
        "errors": [dict(error or TOO_LARGE_ERROR)],
    }


def status(
    message_id: str, state: str = "delivered", *, recipient: str = DEFAULT_SENDER
) -> dict[str, Any]:
    return {
        "id": message_id,
        "status": state,
        "timestamp": str(int(time.time())),
        "recipient_id": recipient,
    }


def webhook(
    phone_number_id: str,
    *,
    messages: Sequence[dict[str, Any]] = (),
    statuses: Sequence[dict[str, Any]] = (),
    errors: Sequence[dict[str, Any]] = (),
    display_phone_number: str = "15550000000",
    waba_id: str = "sandbox-waba",
) -> dict[str, Any]:
    """One entry with one ``messages`` change for ``phone_number_id``."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": display_phone_number,
            "phone_number_id": phone_number_id,
        },
    }
    if messages:
        senders = dict.fromkeys(m["from"] for m in messages)
        value["contacts"] = [{"profile": {"name": "Sandbox"}, "wa_id": s} for s in senders]
        value["messages"] = list(messages)
    if statuses:
        value["statuses"] = list(statuses)
    if errors:
        value["errors"] = list(errors)
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": waba_id, "changes": [{"field": "messages", "value": value}]}],
    }


def merge(bodies: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several webhooks as one POST (many entries), as Meta batches them."""
    entries = [entry for body in bodies for entry in body["entry"]]
    return {"object": "whatsapp_business_account", "entry": entries}


def encode(body: dict[str, Any], *, escape_slashes: bool = False) -> bytes:
    """The exact bytes to POST (and sign). ``escape_slashes``: 360dialog's ``\\/`` style."""
    text = json.dumps(body, ensure_ascii=True, separators=(",", ":"))
    if escape_slashes:
        text = text.replace("/", "\\/")
    return text.encode()


def webhook_body(phone_number_id: str, message: dict[str, Any]) -> bytes:
    """The bytes to post (and sign) of one webhook carrying ``message``."""
    return encode(webhook(phone_number_id, messages=[message]))
