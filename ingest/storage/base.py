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
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import quote, unquote, urlsplit

from ingest.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1024 * 1024
COPY_CHUNK = 1 * MiB
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# S3 refuses keys over 1024 bytes; the same limit everywhere keeps backends interchangeable.
MAX_KEY_BYTES = 1024
META_SUFFIX = ".meta.json"

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


# --- rules shared by every backend ------------------------------------------------------


def validate_key(key: str) -> str:
    """Accept only relative POSIX paths whose parts are plain names.

    The local backend needs this to keep keys under its root; the other backends apply it
    too, so a key that works in tests works in production.
    """
    if not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKeyError("storage key is empty or longer than 1024 bytes")
    if key.startswith("/") or "\\" in key or _CONTROL.search(key):
        raise InvalidKeyError(f"storage key {key!r} is absolute or has forbidden characters")
    for part in key.split("/"):
        # Leading dots cover "." and ".." and keep clear of the local backend's temp files.
        if not part or part.startswith("."):
            raise InvalidKeyError(f"storage key {key!r} has an empty or dot-leading part")
    if key.endswith(META_SUFFIX):
        raise InvalidKeyError(f"storage key {key!r} ends with the reserved {META_SUFFIX!r}")
    return key


def _normalise_sha256(sha256: str) -> str:
    value = sha256.strip().lower()
    if not _HEX64.fullmatch(value):
        raise ValueError("sha256 must be 64 hex digits")
    return value


def _check_range(start: int, length: int | None) -> None:
    if start < 0 or (length is not None and length < 0):
        raise ValueError("start and length must not be negative")


def _same_or_conflict(existing: StoredObject, sha256: str) -> StoredObject:
    """A repeated put of the same bytes is a no-op; different bytes are refused."""
    if existing.sha256 == sha256:
        return existing
    raise StorageError(
        f"{existing.backend} key {existing.key!r} already holds different content; "
        "refusing to overwrite"
    )


class _VerifyingReader(io.RawIOBase):
    """Passes a stream through while checking it against the declared size and sha256.

    The check runs when the last declared byte is read, before those bytes are handed on,
    so a multipart upload fails before it is completed and a temp file before it is renamed.
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


# --- local files --------------------------------------------------------------------------


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
        sha256 = _normalise_sha256(sha256)
        path = self.path_for(key)
        existing = self._existing_before_write(key, path)
        if existing is not None:
            return _same_or_conflict(existing, sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".part"
            )
        except OSError as exc:
            raise StorageError(f"cannot write under {self.root}: {_reason(exc)}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(
                    _VerifyingReader(stream, size=size, sha256=sha256), out, COPY_CHUNK
                )
                out.flush()
                os.fsync(out.fileno())
            if not self._link_into_place(tmp, path):
                return _same_or_conflict(self.head(key), sha256)
            # After the data: a sidecar without its data file would describe nothing.
            self._write_meta(path, size=size, sha256=sha256, content_type=content_type)
            _fsync_dir(path.parent)
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"writing {key!r} failed: {_reason(exc)}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return StoredObject(self.backend, key, size, sha256, content_type)

    @contextmanager
    def open(self, key: str, *, start: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        _check_range(start, length)
        path = self.path_for(key)
        try:
            raw = path.open("rb", buffering=0)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(key) from None
        except OSError as exc:
            raise StorageError(f"opening {key!r} failed: {_reason(exc)}") from exc
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
            raise StorageError(f"deleting {key!r} failed: {_reason(exc)}") from exc

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
            raise StorageError(f"storage root {self.root} is not writable: {_reason(exc)}") from exc

    def _head_or_none(self, key: str, path: Path) -> StoredObject | None:
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"reading {key!r} failed: {_reason(exc)}") from exc
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


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


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


# --- memory ------------------------------------------------------------------------------


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
        sha256 = _normalise_sha256(sha256)
        with self._lock:
            if key in self._objects:
                return _same_or_conflict(self._objects[key][1], sha256)
        data = _VerifyingReader(stream, size=size, sha256=sha256).read_all()
        stored = StoredObject(self.backend, key, size, sha256, content_type)
        with self._lock:
            if key in self._objects:
                return _same_or_conflict(self._objects[key][1], sha256)
            self._objects[key] = (data, stored)
        return stored

    @contextmanager
    def open(self, key: str, *, start: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        _check_range(start, length)
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


# --- S3 ----------------------------------------------------------------------------------

# Error codes, by meaning. S3 and its imitations (MinIO, moto) do not agree on all of them.
_S3_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_S3_INTEGRITY = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"})
# The conditional write lost: someone else's object is at the key now.
_S3_EXISTS = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})


def _s3_error_code(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def translate_s3_error(exc: Exception, operation: str, key: str) -> Exception:
    """Map a botocore exception to the storage vocabulary (raise the result ``from exc``)."""
    from botocore.exceptions import FlexibleChecksumError

    code = _s3_error_code(exc)
    if code in _S3_MISSING:
        return FileNotFoundError(key)
    if code in _S3_INTEGRITY or isinstance(exc, FlexibleChecksumError):
        return StorageIntegrityError(
            f"s3 {operation} {key!r}: checksum mismatch ({code or 'response'})"
        )
    detail = code or type(exc).__name__
    return StorageError(f"s3 {operation} {key!r} failed: {detail}")


class _S3Body(io.RawIOBase):
    """A GetObject body as a raw stream whose read failures are storage errors."""

    def __init__(self, body: Any, key: str) -> None:
        super().__init__()
        self._body = body
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import BotoCoreError

        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except (BotoCoreError, OSError) as exc:
            raise translate_s3_error(exc, "read", self._key) from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def _content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact name in RFC 5987 form."""
    clean = _CONTROL.sub("", filename).replace("/", "_").replace("\\", "_") or "download"
    fallback = clean.encode("ascii", "replace").decode("ascii").replace('"', "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(clean, safe='')}"


class S3Storage:
    """Objects in one bucket under an optional prefix, through any S3 API.

    ``put`` never holds a large object in memory: objects up to ``in_memory_limit`` are sent
    from memory, larger ones are spooled through a temp file, at most one part
    (``multipart_chunksize``) at a time, so a failed request can be re-sent and a 100 MB
    file costs one part of disk and almost no memory. Every request carries the SHA256 of
    its body, which S3 checks on arrival (``BadDigest``). The whole-object sha256 is checked
    while streaming, before the last bytes leave: a mismatch aborts the upload, nothing
    appears at the key. The sha256 is also kept in the object's metadata for :meth:`head`.

    Parts go one after another, not in parallel: a worker runs many downloads at once, so
    per-object parallelism would add memory and connections without adding throughput.
    """

    backend = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: S3Client | None = None,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        in_memory_limit: int = 1 * MiB,
        max_pool_connections: int = 32,
        conditional_writes: bool = True,
    ) -> None:
        if multipart_chunksize < 5 * MiB:
            raise ValueError("S3 parts (all but the last) must be at least 5 MiB")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or self._make_client(endpoint_url, max_pool_connections)
        # Never overwrite: every object write through this client is conditional, so two
        # workers racing on one key cannot replace each other's bytes.
        # A store without conditional writes (some older S3 imitations answer 501) can turn
        # them off; the check before writing then still refuses all but a narrow race.
        if conditional_writes:
            events = self.client.meta.events
            events.register("before-parameter-build.s3.PutObject", _if_none_match)
            events.register("before-parameter-build.s3.CompleteMultipartUpload", _if_none_match)
        self._conditional = conditional_writes
        self._threshold = max(multipart_threshold, 1)
        self._chunksize = multipart_chunksize
        self._in_memory_limit = in_memory_limit

    @staticmethod
    def _make_client(endpoint_url: str | None, max_pool_connections: int) -> S3Client:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5,
            read_timeout=60,
            # A threaded worker shares this client: one connection per thread and spare.
            max_pool_connections=max_pool_connections,
            signature_version="s3v4",
            # Custom endpoints (MinIO, moto) usually have no per-bucket DNS names.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Every request is built here from checked values (validate_key, sizes, hex
            # sha256); botocore's client-side model walk was a large share of the worker's
            # CPU per stored object. The service still rejects a malformed request.
            parameter_validation=False,
        )
        session = boto3.session.Session(botocore_session=_botocore_session())
        return session.client("s3", endpoint_url=endpoint_url, config=config)

    def full_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(
        self, key: str, stream: BinaryIO, *, size: int, sha256: str, content_type: str
    ) -> StoredObject:
        from botocore.exceptions import BotoCoreError, ClientError

        sha256 = _normalise_sha256(sha256)
        full = self.full_key(key)
        existing = self._existing_before_write(key, size)
        if existing is not None:
            return _same_or_conflict(existing, sha256)
        reader = _VerifyingReader(stream, size=size, sha256=sha256)
        common: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "ContentType": content_type,
            "Metadata": {"sha256": sha256},
        }
        whole_checksum = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
        try:
            if size <= self._in_memory_limit:
                self.client.put_object(
                    **common, Body=reader.read_all(), ChecksumSHA256=whole_checksum
                )
            else:
                with tempfile.TemporaryFile(prefix="ingest-s3-") as spool:
                    if size < self._threshold:
                        shutil.copyfileobj(reader, spool, COPY_CHUNK)
                        spool.seek(0)
                        self.client.put_object(
                            **common, Body=spool, ContentLength=size, ChecksumSHA256=whole_checksum
                        )
                    else:
                        self._put_multipart(common, reader, spool)
        except (ClientError, BotoCoreError) as exc:
            if _s3_error_code(exc) in _S3_EXISTS:
                return _same_or_conflict(self.head(key), sha256)
            raise translate_s3_error(exc, "put", key) from exc
        except OSError as exc:
            raise StorageError(f"spooling {key!r} for upload failed: {_reason(exc)}") from exc
        return StoredObject(self.backend, key, size, sha256, content_type)

    def _put_multipart(self, common: dict[str, Any], reader: _VerifyingReader, spool: Any) -> None:
        bucket, full = common["Bucket"], common["Key"]
        upload_id = self.client.create_multipart_upload(**common, ChecksumAlgorithm="SHA256")[
            "UploadId"
        ]
        completed = False
        try:
            parts: list[dict[str, Any]] = []
            while True:
                spool.seek(0)
                spool.truncate()
                part_hash = hashlib.sha256()
                length = _copy_at_most(reader, spool, self._chunksize, part_hash)
                if length == 0:
                    break
                spool.seek(0)
                checksum = base64.b64encode(part_hash.digest()).decode("ascii")
                response = self.client.upload_part(
                    Bucket=bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=len(parts) + 1,
                    Body=spool,
                    ContentLength=length,
                    ChecksumSHA256=checksum,
                )
                parts.append(
                    {
                        "PartNumber": len(parts) + 1,
                        "ETag": response["ETag"],
                        "ChecksumSHA256": checksum,
                    }
                )
            self.client.complete_multipart_upload(
                Bucket=bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
            completed = True
        finally:
            if not completed:
                self._abort_multipart(bucket, full, upload_id)

    def _abort_multipart(self, bucket: str, full: str, upload_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.abort_multipart_upload(Bucket=bucket, Key=full, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            # The original failure matters more; a bucket lifecycle rule
            # (AbortIncompleteMultipartUpload) removes parts left behind.
            log.warning("could not abort multipart upload of %r: %s", full, type(exc).__name__)

    @contextmanager
    def open(self, key: str, *, start: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_range(start, length)
        full = self.full_key(key)
        if length == 0:
            self.head(key)  # a missing key stays missing, even for an empty range
            with io.BytesIO() as empty:
                yield empty
            return
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            args["Range"] = f"bytes={start}-{end}"
        else:
            # Whole-object reads of single-part objects are checked against the stored SHA256.
            args["ChecksumMode"] = "ENABLED"
        try:
            response = self.client.get_object(**args)
        except (ClientError, BotoCoreError) as exc:
            if _s3_error_code(exc) == "InvalidRange":
                # Past the end: the same empty read a file gives.
                with io.BytesIO() as empty:
                    yield empty
                return
            raise translate_s3_error(exc, "get", key) from exc
        with io.BufferedReader(_S3Body(response["Body"], key), buffer_size=256 * 1024) as body:
            yield body

    def head(self, key: str) -> StoredObject:
        found = self._head_or_none(key)
        if found is None:
            raise FileNotFoundError(key)
        return found

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))
        except (ClientError, BotoCoreError) as exc:
            if _s3_error_code(exc) in _S3_MISSING:
                return
            raise translate_s3_error(exc, "delete", key) from exc

    def presign(
        self, key: str, *, expires_in: int, filename: str | None, content_type: str
    ) -> str | None:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self.full_key(key),
            "ResponseContentType": content_type,
        }
        if filename:
            params["ResponseContentDisposition"] = _content_disposition(filename)
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            detail = _s3_error_code(exc) or type(exc).__name__
            raise StorageError(f"s3 bucket {self.bucket!r} is not reachable: {detail}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests, benchmarks, the demo)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _s3_error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"s3 bucket {self.bucket!r}: {_s3_error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"s3 bucket {self.bucket!r}: {type(exc).__name__}") from exc
        region = self.client.meta.region_name
        try:
            if region and region != "us-east-1":
                self.client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                )
            else:
                self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _s3_error_code(exc) != "BucketAlreadyOwnedByYou":
                raise StorageError(
                    f"creating s3 bucket {self.bucket!r}: {_s3_error_code(exc)}"
                ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"creating s3 bucket {self.bucket!r}: {type(exc).__name__}") from exc

    def _existing_before_write(self, key: str, size: int) -> StoredObject | None:
        # With conditional writes a single-request put needs no look-up first: IfNoneMatch
        # refuses an existing key (412/409) and only then is it looked at. The look-up still
        # runs before a multipart upload, where it saves sending every part of a large object
        # that is already there, and on stores without conditional writes, where it is the
        # only check before writing.
        if self._conditional and size < self._threshold:
            return None
        return self._head_or_none(key)

    def _head_or_none(self, key: str) -> StoredObject | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
        except (ClientError, BotoCoreError) as exc:
            error = translate_s3_error(exc, "head", key)
            if isinstance(error, FileNotFoundError):
                return None
            raise error from exc
        return StoredObject(
            self.backend,
            key,
            int(response["ContentLength"]),
            response.get("Metadata", {}).get("sha256", ""),
            response.get("ContentType") or DEFAULT_CONTENT_TYPE,
        )


def _copy_at_most(source: BinaryIO | io.RawIOBase, target: Any, limit: int, digest: Any) -> int:
    copied = 0
    while copied < limit:
        chunk = source.read(min(COPY_CHUNK, limit - copied))
        if not chunk:
            break
        digest.update(chunk)
        target.write(chunk)
        copied += len(chunk)
    return copied


_loader_lock = threading.Lock()
_loader: Any = None


def _botocore_session() -> Any:
    """A fresh botocore session (own credentials) sharing one parsed copy of the API models.

    Parsing the S3 model costs ~0.2 s per client; services, tests and benchmarks build many.
    """
    global _loader
    import botocore.session
    from botocore.loaders import create_loader

    with _loader_lock:
        if _loader is None:
            _loader = create_loader()
        session = botocore.session.get_session()
        session.register_component("data_loader", _loader)
    return session


def _if_none_match(params: dict[str, Any], **_: Any) -> None:
    params.setdefault("IfNoneMatch", "*")
