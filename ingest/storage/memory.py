"""A dict of objects with the rules of the real backends.

Used by the tests and by nothing in production (``storage_from_settings`` never returns it);
it lives in the package, not in ``tests/``, so ``from ingest.storage import MemoryStorage``
keeps working for every test that builds a pipeline or an app on it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from ingest.storage.base import (
    StoredObject,
    VerifyingReader,
    check_range,
    normalise_sha256,
    same_or_conflict,
    validate_key,
)


class MemoryStorage:
    """A dict of objects with the same rules as the real backends, for fast tests."""

    backend = "memory"

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, StoredObject]] = {}
        self._lock = threading.Lock()

    def put(
        self, key: str, stream: BinaryIO, *, size: int, sha256: str, content_type: str
    ) -> StoredObject:
        validate_key(key)
        sha256 = normalise_sha256(sha256)
        with self._lock:
            if key in self._objects:
                return same_or_conflict(self._objects[key][1], sha256)
        data = VerifyingReader(stream, size=size, sha256=sha256).read_all()
        stored = StoredObject(self.backend, key, size, sha256, content_type)
        with self._lock:
            if key in self._objects:
                return same_or_conflict(self._objects[key][1], sha256)
            self._objects[key] = (data, stored)
        return stored

    @contextmanager
    def open(self, key: str, *, start: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        check_range(start, length)
        data = self._get(key)[0]
        end = len(data) if length is None else start + length
        with io.BytesIO(data[start:end]) as body:
            yield body

    def head(self, key: str) -> StoredObject:
        return self._get(key)[1]

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def presign(
        self, key: str, *, expires_in: int, filename: str | None, content_type: str
    ) -> str | None:
        return None

    def check(self) -> None:
        return None

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._objects)

    def _get(self, key: str) -> tuple[bytes, StoredObject]:
        validate_key(key)
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise FileNotFoundError(key)
        return found
