"""What the provider's media rules mean for us: types, limits, checksums, queues, keys.

Facts from provider-media-constraints.md. The per-type limits are the provider's limits for
*sending*; inbound items over them are still archived, and flagged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from ingest.models import MediaType
from ingest.queues import LARGE_MEDIA, SMALL_MEDIA

KB = 1024
MB = 1024 * 1024

SEND_LIMITS: dict[MediaType, int] = {
    MediaType.IMAGE: 5 * MB,
    MediaType.AUDIO: 16 * MB,
    MediaType.VIDEO: 16 * MB,
    MediaType.DOCUMENT: 100 * MB,
    MediaType.STICKER: 100 * KB,
}
ANIMATED_STICKER_LIMIT = 500 * KB

# Types that are usually large go to the large-media queue even before their size is known.
LARGE_BY_TYPE = frozenset({MediaType.VIDEO, MediaType.DOCUMENT})

MEDIA_TYPES = frozenset(MediaType)


def send_limit(media_type: MediaType, *, animated: bool = False) -> int:
    if media_type is MediaType.STICKER and animated:
        return ANIMATED_STICKER_LIMIT
    return SEND_LIMITS[media_type]


def over_send_limit(media_type: MediaType, size: int, *, animated: bool = False) -> bool:
    return size > send_limit(media_type, animated=animated)


def queue_for(media_type: MediaType, declared_size: int | None, large_bytes: int) -> str:
    """Large items get their own queue so a burst of 100 MB documents never delays images."""
    if declared_size is not None:
        return LARGE_MEDIA if declared_size >= large_bytes else SMALL_MEDIA
    return LARGE_MEDIA if media_type in LARGE_BY_TYPE else SMALL_MEDIA


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def normalize_sha256(value: str | None) -> str | None:
    """The provider sends sha256 as hex or as base64 (both occur); return lowercase hex.

    Returns None for anything that is neither, rather than guessing.
    """
    if not value:
        return None
    value = value.strip()
    if _HEX64.match(value):
        return value.lower()
    try:
        raw = base64.b64decode(
            value + "=" * (-len(value) % 4),
            altchars=b"-_" if ("-" in value or "_" in value) else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        return None
    if len(raw) != hashlib.sha256().digest_size:
        return None
    return raw.hex()


def base_mime(value: str | None) -> str | None:
    """``audio/ogg; codecs=opus`` -> ``audio/ogg``."""
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
KEY_PART_CHARS = 100


def object_key(instance_name: str, media_type: str, media_ref: str) -> str:
    """Deterministic per (instance, media): a repeated download lands on the same key.

    ``media_ref`` is the media id (or the message id when the provider gave none).
    Unsafe characters are replaced and a short hash keeps distinct refs distinct. Every
    result passes ``storage.validate_key``: three non-empty ASCII parts, none starting with
    a dot, at most 315 bytes in all.
    """
    # surrogatepass: a name decoded from bytes with surrogateescape must not crash the hash.
    seed = f"{instance_name}\0{media_ref}".encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(seed).hexdigest()[:12]
    return f"{_key_part(instance_name)}/{_key_part(media_type)}/{_key_part(media_ref)}-{digest}"


def _key_part(value: str) -> str:
    safe = _UNSAFE_KEY_CHARS.sub("_", value)[:KEY_PART_CHARS]
    # A leading dot would make "." or ".." or a hidden file (the storage refuses all three).
    # Only keys that were refused change: every key already stored keeps its name.
    if not safe or safe.startswith("."):
        return "_" + safe[1:]
    return safe
