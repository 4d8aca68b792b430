"""Object storage behind one small protocol: S3 (any S3 API), the local filesystem, memory.

Chosen by one URL: ``s3://bucket/prefix`` or ``file:///path``. Every backend keeps the same
rules, so a test on :class:`MemoryStorage` says something about production:

- An object is written once. A second ``put`` of the same bytes (same sha256) returns the
  object already there without rewriting it; a ``put`` of different bytes at an existing key
  raises :class:`StorageError`. Nothing is ever silently overwritten.
- ``put`` checks the stream against the declared size and sha256 while it streams, and
  nothing becomes readable at the key unless both match (:class:`StorageIntegrityError`).
- Errors come in a small vocabulary: a missing key is ``FileNotFoundError``; bytes that do
  not match their checksum are :class:`StorageIntegrityError`; any other backend failure is
  :class:`StorageError` (retryable); a malformed key is :class:`InvalidKeyError` (a bug,
  never retried).

One module per backend: ``base`` (the protocol, the records, the errors, the key rule and the
verifying reader every backend uses), ``local``, ``memory`` (used by tests only), ``s3``
and ``s3_client`` (the S3 client's and the managed transfer's settings).
Importing this package imports no AWS library; the S3 backend does that when it is used.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from ingest.settings import Settings
from ingest.storage.base import (
    InvalidKeyError,
    Storage,
    StorageError,
    StorageIntegrityError,
    StoredObject,
    validate_key,
)
from ingest.storage.local import LocalStorage
from ingest.storage.memory import MemoryStorage
from ingest.storage.s3 import S3Storage, translate_s3_error

__all__ = [
    "InvalidKeyError",
    "LocalStorage",
    "MemoryStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageIntegrityError",
    "StoredObject",
    "storage_from_settings",
    "translate_s3_error",
    "validate_key",
]


def storage_from_settings(settings: Settings) -> Storage:
    """The backend ``INGEST_STORAGE_URL`` names (``s3://bucket/prefix`` or ``file:///path``)."""
    parts = urlsplit(settings.storage_url)
    if parts.scheme == "s3":
        return S3Storage(
            bucket=parts.netloc,
            prefix=unquote(parts.path).strip("/"),
            endpoint_url=settings.s3_endpoint_url,
        )
    if parts.scheme == "file":
        return LocalStorage(Path(unquote(parts.path)))
    raise ValueError(f"unsupported storage URL scheme {parts.scheme!r}")
