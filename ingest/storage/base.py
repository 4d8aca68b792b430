"""What every backend shares: the protocol, the stored-object record, the errors, the key rule
and the reader that checks size and sha256 while a ``put`` streams."""

from __future__ import annotations

import hashlib
import io
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

MiB = 1024 * 1024
COPY_CHUNK = 1 * MiB
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# S3 refuses keys over 1024 bytes; the same limit everywhere keeps backends interchangeable.
MAX_KEY_BYTES = 1024
META_SUFFIX = ".meta.json"

_HEX64 = re.compile(r"[0-9a-f]{64}")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class StorageError(Exception):
    """The backend failed in a way that may pass (network, throttling, 5xx): retry later."""


class StorageIntegrityError(StorageError):
    """The bytes do not match their declared size or sha256 (sent or stored)."""


class InvalidKeyError(ValueError):
    """The key is not a safe relative POSIX path: a programming error, never retried."""


@dataclass(frozen=True)
class StoredObject:
    backend: str  # "s3", "file" or "memory"
    key: str
    size: int
    sha256: str  # lowercase hex; "" for an object this service did not write
    content_type: str


class Storage(Protocol):
    backend: str

    def put(
        self, key: str, stream: BinaryIO, *, size: int, sha256: str, content_type: str
    ) -> StoredObject: ...

    def open(
        self, key: str, *, start: int = 0, length: int | None = None
    ) -> AbstractContextManager[BinaryIO]: ...

    def head(self, key: str) -> StoredObject: ...

    def delete(self, key: str) -> None: ...

    def presign(
        self, key: str, *, expires_in: int, filename: str | None, content_type: str
    ) -> str | None: ...

    def check(self) -> None: ...


def validate_key(key: str) -> str:
    """Accept only relative POSIX paths whose parts are plain names.

    The local backend needs this to keep keys under its root; the other backends apply it
    too, so a key that works in tests works in production.
    """
    if not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKeyError("storage key is empty or longer than 1024 bytes")
    if key.startswith("/") or "\\" in key or CONTROL_CHARACTERS.search(key):
        raise InvalidKeyError(f"storage key {key!r} is absolute or has forbidden characters")
    for part in key.split("/"):
        # Leading dots cover "." and ".." and keep clear of the local backend's temp files.
        if not part or part.startswith("."):
            raise InvalidKeyError(f"storage key {key!r} has an empty or dot-leading part")
    if key.endswith(META_SUFFIX):
        raise InvalidKeyError(f"storage key {key!r} ends with the reserved {META_SUFFIX!r}")
    return key


def normalise_sha256(sha256: str) -> str:
    value = sha256.strip().lower()
    if not _HEX64.fullmatch(value):
        raise ValueError("sha256 must be 64 hex digits")
    return value


def check_range(start: int, length: int | None) -> None:
    if start < 0 or (length is not None and length < 0):
        raise ValueError("start and length must not be negative")


def same_or_conflict(existing: StoredObject, sha256: str) -> StoredObject:
    """A repeated put of the same bytes is a no-op; different bytes are refused."""
    if existing.sha256 == sha256:
        return existing
    raise StorageError(
        f"{existing.backend} key {existing.key!r} already holds different content; "
        "refusing to overwrite"
    )


def os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class VerifyingReader(io.RawIOBase):
    """Passes a stream through while checking it against the declared size and sha256.

    The check runs when the last declared byte is read, before those bytes are handed on,
    so a local temp file is never linked into place, and an S3 spool file never uploaded,
    unless both match.
    Not seekable: it is read once, in order.
    """

    def __init__(self, source: BinaryIO, *, size: int, sha256: str) -> None:
        super().__init__()
        if size < 0:
            raise ValueError("size must not be negative")
        self._source = source
        self._size = size
        self._sha256 = sha256
        self._hash = hashlib.sha256()
        self._count = 0
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not view:
            return 0
        if not self._verified and self._count == self._size:
            self._verify()
        if self._verified:
            # Everything declared has been read: the source must be at its end.
            if self._source.read(1):
                raise StorageIntegrityError(f"stream is longer than the declared {self._size}")
            return 0
        want = min(len(view), self._size - self._count)
        data = self._source.read(want)
        if not data:
            raise StorageIntegrityError(
                f"stream ended after {self._count} of the declared {self._size} bytes"
            )
        if len(data) > want:
            raise StorageIntegrityError(f"stream is longer than the declared {self._size}")
        self._hash.update(data)
        self._count += len(data)
        if self._count == self._size:
            self._verify()
        view[: len(data)] = data
        return len(data)

    def read_all(self) -> bytes:
        """Read and verify the whole stream into memory (small objects only)."""
        out = bytearray()
        while chunk := self.read(COPY_CHUNK):
            out += chunk
        return bytes(out)

    def _verify(self) -> None:
        actual = self._hash.hexdigest()
        if actual != self._sha256:
            raise StorageIntegrityError(
                f"sha256 of the stream is {actual}, declared {self._sha256}"
            )
        self._verified = True
