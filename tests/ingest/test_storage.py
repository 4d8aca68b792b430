"""One contract for every storage backend: local files, memory, moto in-process, moto server.

The same test runs against each backend, so code tested on MemoryStorage behaves the same
on S3 in production.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    FlexibleChecksumError,
    ReadTimeoutError,
)
from moto import mock_aws

from ingest.storage import (
    InvalidKeyError,
    LocalStorage,
    MemoryStorage,
    S3Storage,
    Storage,
    StorageError,
    StorageIntegrityError,
    StoredObject,
    storage_from_settings,
    translate_s3_error,
)
from sandbox.stacks import MotoServer
from tests.plugins.s3 import unique_bucket_name

MiB = 1024 * 1024
BACKENDS = ["local", "memory", "moto", "moto_server"]
# Backends whose bytes live outside this process: there, tracemalloc measures only the
# upload path. (Memory and in-process moto keep the object itself in this process.)
OUT_OF_PROCESS = {"local", "moto_server"}


class GeneratedStream(io.RawIOBase):
    """A read-once, unseekable stream fed by a generator: nothing is ever held whole."""

    def __init__(self, size: int, seed: int = 7) -> None:
        super().__init__()
        self._chunks = _chunks(size, seed)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = next(self._chunks, b"")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def generated(size: int, seed: int = 7) -> BinaryIO:
    return io.BufferedReader(GeneratedStream(size, seed))


def _chunks(size: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(left, 256 * 1024)
        yield rng.randbytes(n)
        left -= n


def sha_of_generated(size: int, seed: int = 7) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_bytes(storage: Storage, key: str, data: bytes, content_type: str = "image/jpeg") -> Any:
    return storage.put(
        key, io.BytesIO(data), size=len(data), sha256=sha(data), content_type=content_type
    )


def read(storage: Storage, key: str, **kwargs: Any) -> bytes:
    with storage.open(key, **kwargs) as body:
        return body.read()


def object_keys(storage: Storage) -> list[str]:
    """What the backend really holds, looked at from outside the Storage API."""
    if isinstance(storage, S3Storage):
        listing = storage.client.list_objects_v2(Bucket=storage.bucket)
        return sorted(obj["Key"] for obj in listing.get("Contents", []))
    if isinstance(storage, LocalStorage):
        if not storage.root.exists():
            return []
        return sorted(
            str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file()
        )
    assert isinstance(storage, MemoryStorage)
    return storage.keys()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if backend == "local":
        yield LocalStorage(tmp_path / "objects")
    elif backend == "memory":
        yield MemoryStorage()
    elif backend == "moto":
        request.getfixturevalue("aws_credentials")
        with mock_aws():
            s3 = S3Storage("ingest-test-in-process", "media/in")
            s3.ensure_bucket()
            yield s3
            s3.client.close()
    else:
        server: MotoServer = request.getfixturevalue("moto_server")
        s3 = S3Storage(
            request.getfixturevalue("s3_bucket"), "media", endpoint_url=server.endpoint_url
        )
        yield s3
        s3.client.close()


# --- contract -----------------------------------------------------------------------------


def test_small_round_trip(storage: Storage) -> None:
    data = b"\xff\xd8\xff\xe0 a small jpeg"
    stored = put_bytes(storage, "inst/2024/wamid.A1", data)
    assert stored == StoredObject(
        storage.backend, "inst/2024/wamid.A1", len(data), sha(data), "image/jpeg"
    )
    assert read(storage, "inst/2024/wamid.A1") == data
    assert storage.head("inst/2024/wamid.A1") == stored


def test_empty_object_round_trip(storage: Storage) -> None:
    put_bytes(storage, "empty", b"", "text/plain")
    assert read(storage, "empty") == b""
    assert storage.head("empty").size == 0


def test_spooled_single_request_round_trip(storage: Storage) -> None:
    # Over the in-memory limit, under the multipart threshold.
    data = random.Random(3).randbytes(2 * MiB + 17)
    put_bytes(storage, "doc.pdf", data, "application/pdf")
    assert read(storage, "doc.pdf") == data
    assert storage.head("doc.pdf").sha256 == sha(data)


def test_large_put_streams_and_round_trips(storage: Storage, backend: str) -> None:
    size = 20 * MiB + 123  # three 8 MiB parts on S3, the last one short
    expected = sha_of_generated(size)
    tracemalloc.start()
    try:
        stored = storage.put(
            "video.mp4", generated(size), size=size, sha256=expected, content_type="video/mp4"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored.size == size and stored.sha256 == expected
    if backend in OUT_OF_PROCESS:
        assert peak < size / 4, f"put held {peak / MiB:.1f} MiB of a {size / MiB:.0f} MiB stream"
    digest = hashlib.sha256()
    total = 0
    with storage.open("video.mp4") as body:
        while chunk := body.read(MiB):
            digest.update(chunk)
            total += len(chunk)
    assert (total, digest.hexdigest()) == (size, expected)
    assert storage.head("video.mp4") == stored


RANGES = [
    (10, 20, slice(10, 30)),
    (990, None, slice(990, 1000)),
    (0, None, slice(0, 1000)),
    (995, 100, slice(995, 1000)),
    (0, 1, slice(0, 1)),
    (500, 0, slice(0, 0)),
    (1000, None, slice(0, 0)),
    (2000, 10, slice(0, 0)),
]


def test_range_reads(storage: Storage) -> None:
    data = bytes(range(256)) * 3 + bytes(232)
    assert len(data) == 1000
    put_bytes(storage, "ranged", data)
    for start, length, expected in RANGES:
        got = read(storage, "ranged", start=start, length=length)
        assert got == data[expected], (start, length)


def test_negative_range_is_refused(storage: Storage) -> None:
    put_bytes(storage, "ranged", b"abc")
    with pytest.raises(ValueError):
        read(storage, "ranged", start=-1)


def test_head_reports_what_was_stored(storage: Storage) -> None:
    data = b"OggS voice note"
    put_bytes(storage, "a/voice.ogg", data, "audio/ogg; codecs=opus")
    head = storage.head("a/voice.ogg")
    assert (head.backend, head.key, head.size, head.sha256, head.content_type) == (
        storage.backend,
        "a/voice.ogg",
        len(data),
        sha(data),
        "audio/ogg; codecs=opus",
    )


def test_missing_key_is_file_not_found(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError) as opened:
        read(storage, "no/such/key")
    assert opened.value.args == ("no/such/key",)
    with pytest.raises(FileNotFoundError):
        storage.head("no/such/key")
    with pytest.raises(FileNotFoundError):
        read(storage, "no/such/key", start=5, length=0)


def test_delete_is_idempotent(storage: Storage) -> None:
    put_bytes(storage, "gone", b"bytes")
    storage.delete("gone")
    with pytest.raises(FileNotFoundError):
        storage.head("gone")
    storage.delete("gone")
    storage.delete("never/existed")
    assert object_keys(storage) == []


@pytest.mark.parametrize("size", [1024, 2 * MiB, 9 * MiB], ids=["memory", "spooled", "multipart"])
def test_checksum_mismatch_leaves_nothing(storage: Storage, size: int) -> None:
    wrong = sha(b"something else")
    with pytest.raises(StorageIntegrityError):
        storage.put("bad", generated(size), size=size, sha256=wrong, content_type="image/png")
    with pytest.raises(FileNotFoundError):
        storage.head("bad")
    with pytest.raises(FileNotFoundError):
        read(storage, "bad")
    assert object_keys(storage) == []
    if isinstance(storage, S3Storage):
        uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket)
        assert uploads.get("Uploads", []) == []


@pytest.mark.parametrize(
    ("actual", "declared"), [(100, 101), (101, 100), (9 * MiB, 9 * MiB + 1), (9 * MiB + 1, 9 * MiB)]
)
def test_size_mismatch_leaves_nothing(storage: Storage, actual: int, declared: int) -> None:
    with pytest.raises(StorageIntegrityError):
        storage.put(
            "short",
            generated(actual),
            size=declared,
            sha256=sha_of_generated(min(actual, declared)),
            content_type="image/png",
        )
    with pytest.raises(FileNotFoundError):
        storage.head("short")
    assert object_keys(storage) == []


def test_repeated_put_of_same_bytes_keeps_one_object(storage: Storage) -> None:
    data = b"same bytes, downloaded twice"
    first = put_bytes(storage, "dup", data)
    before = object_keys(storage)
    second = put_bytes(storage, "dup", data)
    assert second == first
    assert object_keys(storage) == before
    assert len([k for k in before if k.endswith("dup")]) == 1
    assert read(storage, "dup") == data


def test_put_of_different_bytes_never_overwrites(storage: Storage) -> None:
    put_bytes(storage, "taken", b"original")
    with pytest.raises(StorageError) as raised:
        put_bytes(storage, "taken", b"imposter")
    assert not isinstance(raised.value, StorageIntegrityError)
    assert read(storage, "taken") == b"original"
    assert storage.head("taken").sha256 == sha(b"original")


# MemoryStorage checks and writes under one lock: it has no window to race in.
@pytest.mark.parametrize("backend", ["local", "moto", "moto_server"])
@pytest.mark.parametrize("size", [100, 2 * MiB, 9 * MiB], ids=["single", "spooled", "multipart"])
def test_conditional_write_settles_a_race(
    storage: Storage, backend: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers both saw the key free: the store itself must refuse the second write."""
    data = random.Random(5).randbytes(size)
    put_bytes(storage, "raced", data)
    monkeypatch.setattr(storage, "_existing_before_write", lambda *args: None)
    assert put_bytes(storage, "raced", data).sha256 == sha(data)
    other = random.Random(6).randbytes(size)
    with pytest.raises(StorageError):
        put_bytes(storage, "raced", other)
    monkeypatch.undo()
    assert storage.head("raced").sha256 == sha(data)
    assert read(storage, "raced", start=0, length=64) == data[:64]


UNSAFE_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "a/../../outside",
    "a/./b",
    ".",
    "a//b",
    "a/",
    "a\\b",
    "a\x00b",
    "line\nbreak",
    ".hidden",
    "x.meta.json",
    "k" * 1025,
]


def test_unsafe_keys_are_rejected(storage: Storage) -> None:
    for key in UNSAFE_KEYS:
        with pytest.raises(InvalidKeyError):
            put_bytes(storage, key, b"x")
        with pytest.raises(InvalidKeyError):
            storage.head(key)
        with pytest.raises(InvalidKeyError):
            read(storage, key)
        with pytest.raises(InvalidKeyError):
            storage.delete(key)
    assert object_keys(storage) == []


def test_check_passes_on_a_working_backend(storage: Storage) -> None:
    storage.check()


def test_presign(storage: Storage, backend: str) -> None:
    data = b"%PDF-1.7 report"
    put_bytes(storage, "report.pdf", data, "application/pdf")
    url = storage.presign(
        "report.pdf",
        expires_in=300,
        filename='relatório "final".pdf',
        content_type="application/pdf",
    )
    if backend in ("local", "memory"):
        assert url is None
        return
    assert url is not None and "X-Amz-Signature=" in url
    if backend == "moto_server":
        response = httpx.get(url)
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["content-type"] == "application/pdf"
        disposition = response.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="relat?rio _final_.pdf"')
        assert "filename*=UTF-8''relat%C3%B3rio%20%22final%22.pdf" in disposition


# --- local files ------------------------------------------------------------------------


def test_local_symlink_out_of_root_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = LocalStorage(tmp_path / "root")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKeyError):
        put_bytes(storage, "link/escaped", b"x")
    assert list(outside.iterdir()) == []


def test_local_failed_put_leaves_no_temp_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageIntegrityError):
        storage.put("a/b", io.BytesIO(b"abc"), size=3, sha256=sha(b"abd"), content_type="x/y")
    assert [p for p in (tmp_path / "root").rglob("*") if p.is_file()] == []


def test_local_layout_is_key_plus_sidecar(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    put_bytes(storage, "inst/m1", b"bytes", "image/webp")
    assert (tmp_path / "root" / "inst" / "m1").read_bytes() == b"bytes"
    assert sorted(p.name for p in (tmp_path / "root" / "inst").iterdir()) == ["m1", "m1.meta.json"]


def test_local_head_without_sidecar_trusts_the_bytes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    put_bytes(storage, "m", b"bytes", "image/webp")
    (tmp_path / "root" / "m.meta.json").unlink()
    head = storage.head("m")
    assert (head.size, head.sha256, head.content_type) == (
        5,
        sha(b"bytes"),
        "application/octet-stream",
    )


def test_local_check_fails_when_root_is_unusable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        LocalStorage(blocker).check()
    with pytest.raises(StorageError):
        put_bytes(LocalStorage(blocker), "k", b"x")


def test_local_check_creates_a_missing_root(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "new" / "root").check()
    assert (tmp_path / "new" / "root").is_dir()


# --- S3 specifics ----------------------------------------------------------------------


def test_s3_keys_live_under_the_prefix(moto_server: MotoServer, s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "/tenant/media/", endpoint_url=moto_server.endpoint_url)
    put_bytes(storage, "inst/m1", b"x")
    assert object_keys(storage) == ["tenant/media/inst/m1"]
    bare = S3Storage(s3_bucket, endpoint_url=moto_server.endpoint_url)
    assert bare.head("tenant/media/inst/m1").size == 1
    storage.client.close()
    bare.client.close()


def test_s3_small_put_is_one_request_and_looks_only_after_a_refusal(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    """IfNoneMatch guards the write, so no HEAD precedes it; one follows a 412 only."""
    storage = S3Storage(s3_bucket, endpoint_url=moto_server.endpoint_url)
    calls: list[str] = []
    storage.client.meta.events.register(
        "before-call.s3", lambda model, **_: calls.append(model.name)
    )
    put_bytes(storage, "once", b"first copy")
    assert calls == ["PutObject"]
    calls.clear()
    put_bytes(storage, "once", b"first copy")
    assert calls == ["PutObject", "HeadObject"]
    calls.clear()
    with pytest.raises(StorageError):
        put_bytes(storage, "once", b"other bytes")
    assert calls == ["PutObject", "HeadObject"]
    assert read(storage, "once") == b"first copy"
    storage.client.close()


def _record_requests(storage: S3Storage) -> list[tuple[str, dict[str, str], bool]]:
    """Every request as sent: operation, headers (lower-case names), sent from this thread."""
    sent: list[tuple[str, dict[str, str], bool]] = []
    caller = threading.current_thread()

    def record(request: Any, event_name: str, **_: Any) -> None:
        headers = {
            name.lower(): value.decode() if isinstance(value, bytes) else value
            for name, value in request.headers.items()
        }
        sent.append((event_name.rsplit(".", 1)[-1], headers, threading.current_thread() is caller))

    storage.client.meta.events.register("before-send.s3", record)
    return sent


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.mark.parametrize("size", [1024, 2 * MiB], ids=["memory", "spooled"])
def test_s3_single_request_carries_the_pipeline_sha256_and_nothing_hashed_again(
    moto_server: MotoServer, s3_bucket: str, size: int
) -> None:
    """S3 checks the pipeline's own digest; the SDK adds no checksum and signs no payload."""
    storage = S3Storage(s3_bucket, endpoint_url=moto_server.endpoint_url)
    sent = _record_requests(storage)
    data = random.Random(8).randbytes(size)
    put_bytes(storage, "one", data, "application/pdf")
    assert [operation for operation, _, _ in sent] == ["PutObject"]
    _, headers, from_caller = sent[0]
    assert headers["x-amz-checksum-sha256"] == _b64_sha256(data)
    assert headers["if-none-match"] == "*"
    # A hex digest here would mean botocore hashed the body to sign it.
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert not [
        h for h in headers if h.startswith("x-amz-checksum-") and h != "x-amz-checksum-sha256"
    ]
    assert "x-amz-trailer" not in headers and "x-amz-sdk-checksum-algorithm" not in headers
    assert from_caller
    raw = storage.client.head_object(Bucket=s3_bucket, Key="one")
    assert (raw["ContentType"], raw["Metadata"]) == ("application/pdf", {"sha256": sha(data)})
    storage.client.close()


def test_s3_multipart_put_sends_sha256_per_part_from_the_calling_thread(
    moto_server: MotoServer, s3_bucket: str
) -> None:
    """S3 has no whole-object SHA256 for multipart: each part carries its own, hashed once."""
    storage = S3Storage(s3_bucket, endpoint_url=moto_server.endpoint_url)
    data = random.Random(9).randbytes(9 * MiB)
    sent = _record_requests(storage)
    put_bytes(storage, "big", data, "video/mp4")
    operations = [operation for operation, _, _ in sent]
    assert operations == [
        "HeadObject",
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    assert all(from_caller for _, _, from_caller in sent), "use_threads=False: no pool"
    create, first, second, complete = (headers for _, headers, _ in sent[1:])
    assert create["x-amz-checksum-algorithm"] == "SHA256"
    assert "x-amz-checksum-sha256" not in create  # no FULL_OBJECT SHA256, which S3 refuses
    assert first["x-amz-checksum-sha256"] == _b64_sha256(data[: 8 * MiB])
    assert second["x-amz-checksum-sha256"] == _b64_sha256(data[8 * MiB :])
    for part in (first, second):
        assert part["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert "x-amz-checksum-crc32" not in part and "x-amz-trailer" not in part
    assert complete["if-none-match"] == "*"
    raw = storage.client.head_object(Bucket=s3_bucket, Key="big")
    assert (raw["ContentType"], raw["Metadata"]) == ("video/mp4", {"sha256": sha(data)})
    storage.client.close()


def test_s3_multipart_put_over_other_bytes_is_refused_at_completion(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The managed transfer's CompleteMultipartUpload carries IfNoneMatch too: the 412 is
    looked at (same bytes: success; other bytes: refused) and no upload is left behind."""
    storage = S3Storage(s3_bucket, endpoint_url=moto_server.endpoint_url)
    original = random.Random(10).randbytes(9 * MiB)
    put_bytes(storage, "taken", original)
    monkeypatch.setattr(storage, "_existing_before_write", lambda *args: None)
    sent = _record_requests(storage)
    with pytest.raises(StorageError) as refused:
        put_bytes(storage, "taken", random.Random(11).randbytes(9 * MiB))
    assert not isinstance(refused.value, StorageIntegrityError)
    operations = [operation for operation, _, _ in sent]
    assert operations[-3:] == ["CompleteMultipartUpload", "AbortMultipartUpload", "HeadObject"]
    sent.clear()
    assert put_bytes(storage, "taken", original).sha256 == sha(original)
    assert [operation for operation, _, _ in sent][-2:] == ["AbortMultipartUpload", "HeadObject"]
    assert storage.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert storage.head("taken").sha256 == sha(original)
    storage.client.close()


def test_s3_mismatched_body_sends_no_bytes(moto_server: MotoServer, s3_bucket: str) -> None:
    """The spool is verified before the transfer starts: nothing but the look-up is sent."""
    storage = S3Storage(s3_bucket, endpoint_url=moto_server.endpoint_url)
    sent = _record_requests(storage)
    size = 9 * MiB
    with pytest.raises(StorageIntegrityError):
        storage.put("bad", generated(size), size=size, sha256=sha(b"other"), content_type="x/y")
    assert [operation for operation, _, _ in sent] == ["HeadObject"]
    storage.client.close()


def test_s3_check_fails_for_missing_bucket(moto_server: MotoServer, aws_credentials: Any) -> None:
    storage = S3Storage(unique_bucket_name(), endpoint_url=moto_server.endpoint_url)
    with pytest.raises(StorageError):
        storage.check()
    storage.ensure_bucket()
    storage.check()
    storage.ensure_bucket()  # already there: still fine
    storage.client.close()


def test_s3_unreachable_endpoint_is_a_storage_error(aws_credentials: Any) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now; one attempt keeps the test quick.
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=1),
    )
    storage = S3Storage("bucket-x", client=client)
    with pytest.raises(StorageError) as checked:
        storage.check()
    assert not isinstance(checked.value, FileNotFoundError)
    with pytest.raises(StorageError):
        storage.head("k")
    with pytest.raises(StorageError):
        put_bytes(storage, "k", b"x")
    client.close()


@pytest.mark.parametrize("backend", ["moto", "moto_server"])
def test_s3_read_failures_are_storage_errors(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(storage, S3Storage)
    put_bytes(storage, "k", b"0123456789")

    class BrokenBody:
        def read(self, n: int = -1) -> bytes:
            raise ReadTimeoutError(endpoint_url="http://s3")

        def close(self) -> None:
            pass

    real_get = storage.client.get_object
    monkeypatch.setattr(
        storage.client, "get_object", lambda **kw: {**real_get(**kw), "Body": BrokenBody()}
    )
    with pytest.raises(StorageError), storage.open("k") as body:
        body.read()


def _client_error(code: str, status: int = 400) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_client_error("NoSuchKey", 404), FileNotFoundError),
        (_client_error("404", 404), FileNotFoundError),
        (_client_error("BadDigest"), StorageIntegrityError),
        (_client_error("XAmzContentSHA256Mismatch"), StorageIntegrityError),
        (FlexibleChecksumError(error_msg="mismatch"), StorageIntegrityError),
        (_client_error("SlowDown", 503), StorageError),
        (_client_error("InternalError", 500), StorageError),
        (_client_error("AccessDenied", 403), StorageError),
        (EndpointConnectionError(endpoint_url="http://s3"), StorageError),
    ],
)
def test_s3_errors_map_to_the_storage_vocabulary(exc: Exception, kind: type[Exception]) -> None:
    translated = translate_s3_error(exc, "put", "inst/m1")
    assert type(translated) is kind
    if kind is StorageError:
        assert not isinstance(translated, StorageIntegrityError)


def test_s3_rejects_parts_below_the_s3_minimum() -> None:
    with pytest.raises(ValueError):
        S3Storage("bucket-x", client=object(), multipart_chunksize=MiB)  # type: ignore[arg-type]


# --- choosing the backend -------------------------------------------------------------


def test_storage_from_settings_file_url(make_settings: Any, tmp_path: Path) -> None:
    storage = storage_from_settings(make_settings(storage_url=(tmp_path / "m d").as_uri()))
    assert isinstance(storage, LocalStorage)
    assert storage.root == (tmp_path / "m d").resolve()


def test_storage_from_settings_s3_url(make_settings: Any, aws_credentials: Any) -> None:
    storage = storage_from_settings(
        make_settings(
            storage_url="s3://media-bucket/wa/prod/", s3_endpoint_url="http://127.0.0.1:9"
        )
    )
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("media-bucket", "wa/prod")
    assert storage.client.meta.endpoint_url == "http://127.0.0.1:9"
    config: Any = storage.client.meta.config
    assert config.max_pool_connections >= 32
    assert config.retries["mode"] == "standard"
    assert (config.connect_timeout, config.read_timeout) == (5, 60)
    storage.client.close()
    bare = storage_from_settings(make_settings(storage_url="s3://media-bucket"))
    assert isinstance(bare, S3Storage) and bare.prefix == ""
    bare.client.close()


def test_storage_from_settings_on_the_moto_server(s3_settings: Any) -> None:
    storage = storage_from_settings(s3_settings)
    put_bytes(storage, "inst/m1", b"through the settings")
    assert read(storage, "inst/m1") == b"through the settings"
    assert isinstance(storage, S3Storage)
    storage.client.close()


def test_moto_server_fixture_environment(aws_credentials: dict[str, str]) -> None:
    assert os.environ["AWS_ACCESS_KEY_ID"] == aws_credentials["AWS_ACCESS_KEY_ID"]
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"


def test_s3_sends_the_pipelines_spool_file_as_it_is(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool past its memory threshold is a named file: verified in place and uploaded by
    its path, with no second copy written; a spool whose bytes differ is not sent."""
    from ingest.integrity import HashingSpool
    from ingest.storage import s3 as s3_module

    storage = S3Storage(s3_bucket, endpoint_url=moto_server.endpoint_url)
    data = random.Random(12).randbytes(3 * MiB)

    named_file = s3_module.tempfile.NamedTemporaryFile

    def no_upload_copy(*args: Any, **kwargs: Any) -> Any:
        # The spool itself is a named temporary file too; only the upload's copy is refused.
        if kwargs.get("prefix") == "ingest-s3-":
            raise AssertionError("a named spool file was copied before its upload")
        return named_file(*args, **kwargs)

    monkeypatch.setattr(s3_module.tempfile, "NamedTemporaryFile", no_upload_copy)
    with HashingSpool(cap=len(data)) as spool:
        spool.write(data)
        source = spool.reader()
        assert isinstance(source.name, str)
        storage.put("spooled", source, size=len(data), sha256=sha(data), content_type="x/y")
    assert read(storage, "spooled") == data

    with HashingSpool(cap=len(data)) as spool, pytest.raises(StorageIntegrityError):
        spool.write(data)
        storage.put(
            "wrong", spool.reader(), size=len(data), sha256=sha(b"other"), content_type="x/y"
        )
    assert "wrong" not in object_keys(storage)
