"""Object storage behind one small protocol: S3 (any S3 API) or the local filesystem.

Chosen by one URL: ``s3://bucket/prefix`` or ``file:///path``. PLACEHOLDER: the backends
are being written; the protocol below is the contract.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ingest.settings import Settings


class StorageError(Exception):
    """The backend failed in a way that may pass (network, throttling, 5xx): retry later."""


class StorageIntegrityError(StorageError):
    """The store received bytes whose checksum differs from the one we sent."""


@dataclass(frozen=True)
class StoredObject:
    backend: str  # "s3" or "file"
    key: str
    size: int
    sha256: str  # lowercase hex
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


def storage_from_settings(settings: Settings) -> Storage:
    raise NotImplementedError("storage backends are being written")
