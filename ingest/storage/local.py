"""Files under one root directory, each with a ``<key>.meta.json`` sidecar."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from ingest.storage.base import (
    COPY_CHUNK,
    DEFAULT_CONTENT_TYPE,
    META_SUFFIX,
    InvalidKeyError,
    StorageError,
    StoredObject,
    VerifyingReader,
    check_range,
    normalise_sha256,
    os_reason,
    same_or_conflict,
    validate_key,
)


class LocalStorage:
    """Files under one root directory; sha256 and content type in a ``<key>.meta.json``.

    Writes go to a temp file in the target directory, are fsynced, verified, and only then
    hard-linked into place: the link fails if the key exists, which makes the no-overwrite
    rule atomic even between processes.
    """

    backend = "file"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path_for(self, key: str) -> Path:
        validate_key(key)
        path = (self.root / key).resolve()
        # resolve() follows symlinks: a link inside the root that points out is refused too.
        if not path.is_relative_to(self.root) or path == self.root:
            raise InvalidKeyError(f"storage key {key!r} leaves the storage root")
        return path

    def put(
        self, key: str, stream: BinaryIO, *, size: int, sha256: str, content_type: str
    ) -> StoredObject:
        sha256 = normalise_sha256(sha256)
        path = self.path_for(key)
        existing = self._existing_before_write(key, path)
        if existing is not None:
            return same_or_conflict(existing, sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".part"
            )
        except OSError as exc:
            raise StorageError(f"cannot write under {self.root}: {os_reason(exc)}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(
                    VerifyingReader(stream, size=size, sha256=sha256), out, COPY_CHUNK
                )
                out.flush()
                os.fsync(out.fileno())
            if not self._link_into_place(tmp, path):
                return same_or_conflict(self.head(key), sha256)
            # After the data: a sidecar without its data file would describe nothing.
            self._write_meta(path, size=size, sha256=sha256, content_type=content_type)
            _fsync_dir(path.parent)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"writing {key!r} failed: {os_reason(exc)}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return StoredObject(self.backend, key, size, sha256, content_type)

    @contextmanager
    def open(self, key: str, *, start: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        check_range(start, length)
        path = self.path_for(key)
        try:
            raw = path.open("rb", buffering=0)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(key) from None
        except OSError as exc:
            raise StorageError(f"opening {key!r} failed: {os_reason(exc)}") from exc
        with raw:
            if start:
                raw.seek(start)
            source = raw if length is None else _BoundedReader(raw, length)
            # Closed with the context, so a caller that lets go early leaks no file handle.
            with io.BufferedReader(source) as buffered:
                yield buffered

    def head(self, key: str) -> StoredObject:
        found = self._head_or_none(key, self.path_for(key))
        if found is None:
            raise FileNotFoundError(key)
        return found

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            path.unlink(missing_ok=True)
            _meta_path(path).unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StorageError(f"deleting {key!r} failed: {os_reason(exc)}") from exc

    def presign(
        self, key: str, *, expires_in: int, filename: str | None, content_type: str
    ) -> str | None:
        return None

    def check(self) -> None:
        """The root exists (created if missing) and a file can be written in it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root, prefix=".check."):
                pass
        except OSError as exc:
            raise StorageError(
                f"storage root {self.root} is not writable: {os_reason(exc)}"
            ) from exc

    def _head_or_none(self, key: str, path: Path) -> StoredObject | None:
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"reading {key!r} failed: {os_reason(exc)}") from exc
        if not path.is_file():
            return None
        meta = self._read_meta(path)
        if meta is not None and meta.get("size") == stat.st_size:
            return StoredObject(
                self.backend, key, stat.st_size, str(meta["sha256"]), str(meta["content_type"])
            )
        # Sidecar missing (a writer between link and sidecar, or a crash there): the bytes
        # themselves are the truth.
        return StoredObject(self.backend, key, stat.st_size, _hash_file(path), DEFAULT_CONTENT_TYPE)

    def _existing_before_write(self, key: str, path: Path) -> StoredObject | None:
        # Saves writing bytes that are already there; the hard link settles races.
        return self._head_or_none(key, path)

    @staticmethod
    def _link_into_place(tmp: Path, path: Path) -> bool:
        """Publish ``tmp`` at ``path`` unless something is already there; False if it was."""
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        # A filesystem without hard links: the check and the rename are two steps.
        if path.exists():
            return False
        os.replace(tmp, path)
        return True

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads(_meta_path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not {"sha256", "size", "content_type"} <= meta.keys():
            return None
        return meta

    @staticmethod
    def _write_meta(path: Path, *, size: int, sha256: str, content_type: str) -> None:
        body = json.dumps({"sha256": sha256, "size": size, "content_type": content_type})
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".meta")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, _meta_path(path))
        finally:
            Path(tmp_name).unlink(missing_ok=True)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + META_SUFFIX)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make the new directory entry durable, not only the file's bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _BoundedReader(io.RawIOBase):
    """At most ``remaining`` bytes of a raw stream: a range read on a local file."""

    def __init__(self, raw: BinaryIO, remaining: int) -> None:
        super().__init__()
        self._raw = raw
        self._remaining = remaining

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._remaining <= 0:
            return 0
        data = self._raw.read(min(len(view), self._remaining))
        self._remaining -= len(data)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()
