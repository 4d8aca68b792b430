"""Objects in one S3 bucket (AWS or any S3 API: MinIO, moto), through boto3.

boto3 and botocore are imported where they are used, so importing :mod:`ingest.storage`
costs nothing on a deployment that stores files locally.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

from ingest.storage.base import (
    CONTROL_CHARACTERS,
    COPY_CHUNK,
    DEFAULT_CONTENT_TYPE,
    MiB,
    StorageError,
    StorageIntegrityError,
    StoredObject,
    VerifyingReader,
    check_range,
    normalise_sha256,
    os_reason,
    same_or_conflict,
    validate_key,
)
from ingest.storage.s3_client import make_client, transfer_config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

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
    clean = CONTROL_CHARACTERS.sub("", filename).replace("/", "_").replace("\\", "_") or "download"
    fallback = clean.encode("ascii", "replace").decode("ascii").replace('"', "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(clean, safe='')}"


@contextmanager
def _verified_file(stream: BinaryIO, reader: VerifyingReader) -> Iterator[str]:
    """A path to the verified bytes. A stream that is a file on disk read from its start (the
    pipeline's spool) is verified in place and sent as it is; any other stream is verified
    into a temporary file first."""
    name = getattr(stream, "name", None)
    if isinstance(name, str) and os.path.isfile(name) and stream.tell() == 0:
        while reader.read(COPY_CHUNK):
            pass
        yield name
        return
    with tempfile.NamedTemporaryFile(prefix="ingest-s3-") as spool:
        shutil.copyfileobj(reader, spool, COPY_CHUNK)
        spool.flush()
        yield spool.name


class S3Storage:
    """Objects in one bucket under an optional prefix, through any S3 API.

    ``put`` never holds a large object in memory. Objects up to ``in_memory_limit`` go from
    memory in one request. Larger ones are first copied through the verifying reader into a
    temp file, so the whole object's size and sha256 are checked before a byte is sent, then
    handed to boto3's managed transfer, which reads the file back from disk as it sends: one
    request below ``multipart_threshold``, else a multipart upload of ``multipart_chunksize``
    parts, aborted by s3transfer on any failure. A file, not a stream, is what lets the
    transfer re-send a part after a failed request without keeping it in memory; the price
    is disk for the whole object while it uploads.

    Every request that carries bytes carries a SHA256 of them that S3 checks on arrival
    (``BadDigest``). A single request carries the pipeline's own sha256 of the whole object,
    so the store confirms it keeps exactly the bytes that were verified. A multipart upload
    cannot: S3 has no whole-object SHA256 for multipart uploads (its full-object checksums are
    CRCs; its SHA256 of a multipart object is a digest of the parts' digests), so each part
    carries a SHA256 the SDK computes, as the parts of our own loop did before. The sha256 is
    also kept in the object's metadata for :meth:`head`.
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
        self.client = client or make_client(endpoint_url, max_pool_connections)
        # Never overwrite: every object write through this client is conditional, so two
        # workers racing on one key cannot replace each other's bytes. The managed transfer
        # sends its PutObject and CompleteMultipartUpload through this client, so they are
        # covered too.
        # A store without conditional writes (some older S3 imitations answer 501) can turn
        # them off; the check before writing then still refuses all but a narrow race.
        if conditional_writes:
            events = self.client.meta.events
            events.register("before-parameter-build.s3.PutObject", _if_none_match)
            events.register("before-parameter-build.s3.CompleteMultipartUpload", _if_none_match)
        self._conditional = conditional_writes
        self._threshold = max(multipart_threshold, 1)
        self._in_memory_limit = in_memory_limit
        self._transfer = transfer_config(self._threshold, multipart_chunksize)

    def full_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(
        self, key: str, stream: BinaryIO, *, size: int, sha256: str, content_type: str
    ) -> StoredObject:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        sha256 = normalise_sha256(sha256)
        full = self.full_key(key)
        existing = self._existing_before_write(key, size)
        if existing is not None:
            return same_or_conflict(existing, sha256)
        reader = VerifyingReader(stream, size=size, sha256=sha256)
        extra: dict[str, Any] = {"ContentType": content_type, "Metadata": {"sha256": sha256}}
        try:
            if size <= self._in_memory_limit:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=reader.read_all(),
                    ChecksumSHA256=_base64_digest(sha256),
                    **extra,
                )
            else:
                # By name: the transfer then reads each part from disk as it sends it; given
                # a file object, it would read every part into memory first.
                with _verified_file(stream, reader) as path:
                    self.client.upload_file(
                        path,
                        self.bucket,
                        full,
                        ExtraArgs={**extra, **self._checksum_args(size, sha256)},
                        Config=self._transfer,
                    )
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            error = _client_error_behind(exc)
            if _s3_error_code(error) in _S3_EXISTS:
                return same_or_conflict(self.head(key), sha256)
            raise translate_s3_error(error, "put", key) from exc
        except OSError as exc:
            raise StorageError(f"spooling {key!r} for upload failed: {os_reason(exc)}") from exc
        return StoredObject(self.backend, key, size, sha256, content_type)

    def _checksum_args(self, size: int, sha256: str) -> dict[str, str]:
        if size < self._threshold:
            return {"ChecksumSHA256": _base64_digest(sha256)}
        # Given ChecksumSHA256, s3transfer would ask for a FULL_OBJECT SHA256 on the multipart
        # upload, which S3 does not offer (moto accepts it without checking). The whole object
        # was checked while spooling; S3 checks each part against the SDK's SHA256 of it.
        return {"ChecksumAlgorithm": "SHA256"}

    @contextmanager
    def open(self, key: str, *, start: int = 0, length: int | None = None) -> Iterator[BinaryIO]:
        from botocore.exceptions import BotoCoreError, ClientError

        check_range(start, length)
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


def _base64_digest(sha256: str) -> str:
    """The ``x-amz-checksum-sha256`` form of a hex sha256."""
    return base64.b64encode(bytes.fromhex(sha256)).decode("ascii")


def _client_error_behind(exc: Exception) -> Exception:
    """The ClientError inside boto3's ``S3UploadFailedError``, which keeps only its message.

    ``upload_file`` re-raises a failed request's ClientError as ``S3UploadFailedError``; the
    error code (a refused overwrite is 412) survives only on the original, its context.
    """
    from botocore.exceptions import ClientError

    for inner in (exc.__cause__, exc.__context__):
        if isinstance(inner, ClientError):
            return inner
    return exc


def _if_none_match(params: dict[str, Any], **_: Any) -> None:
    params.setdefault("IfNoneMatch", "*")
