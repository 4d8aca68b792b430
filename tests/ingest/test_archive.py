"""The archive lookup rules without HTTP: checks and their order, base64 chunks, the limiter."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import limits.storage.memory
import limits.storage.redis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.orm import Session

from ingest import accounts, archive, rate_limit
from ingest.archive import ArchiveError, MediaRecord
from ingest.models import MediaState
from ingest.rate_limit import RateLimiter, redis_storage
from ingest.storage import StorageIntegrityError
from tests.factories import make_instance, make_media_item

# --- base64 chunks ---------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """Returns at most ``step`` bytes per read, as a network stream may."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._step, len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=5000),
    chunk_units=st.integers(min_value=1, max_value=50),
    step=st.integers(min_value=1, max_value=700),
)
def test_chunks_concatenate_to_the_encoding(data: bytes, chunk_units: int, step: int) -> None:
    chunk = 3 * chunk_units
    parts = list(archive.b64_chunks(Trickle(data, step), len(data), chunk_bytes=chunk))
    joined = b"".join(parts)
    assert joined == base64.b64encode(data)
    assert len(joined) == archive.base64_length(len(data))
    # Each chunk encodes at most one chunk of input (plus the few carried bytes).
    assert all(len(part) <= 4 * (chunk + 2) // 3 + 4 for part in parts)


def test_chunks_stop_at_the_declared_size() -> None:
    assert b"".join(archive.b64_chunks(io.BytesIO(b"abcdef-extra"), 6)) == b"YWJjZGVm"


def test_a_short_stream_is_an_integrity_error() -> None:
    with pytest.raises(StorageIntegrityError):
        list(archive.b64_chunks(io.BytesIO(b"abc"), 10))


def test_chunk_size_must_be_a_multiple_of_three() -> None:
    with pytest.raises(ValueError, match="multiple of 3"):
        list(archive.b64_chunks(io.BytesIO(b"abcd"), 4, chunk_bytes=4))


# --- envelope, metadata, names -----------------------------------------------------------


def record(**overrides: Any) -> MediaRecord:
    values: dict[str, Any] = {
        "instance": "shop",
        "message_id": "wamid.ABC",
        "media_type": "image",
        "state": MediaState.STORED,
        "failure_reason": None,
        "declared_mime": "image/jpeg",
        "actual_mime": None,
        "declared_sha256": None,
        "actual_sha256": "ab" * 32,
        "declared_size": None,
        "size": 5,
        "filename": None,
        "caption": None,
        "sender": None,
        "voice": False,
        "animated": False,
        "over_send_limit": False,
        "message_timestamp": None,
        "received_at": None,
        "stored_at": None,
        "expires_at": None,
        "attempts": 1,
        "storage_key": "shop/image/x",
    }
    values.update(overrides)
    return MediaRecord(**values)


@pytest.mark.parametrize("message_id", ["wamid.ABC", 'quote"and\\slash', "ünï\u2028"])
def test_envelope_wraps_the_encoding_into_the_seed_body(message_id: str) -> None:
    rec = record(message_id=message_id, size=5)
    envelope = archive.base64_envelope(rec)
    body = envelope.prefix + base64.b64encode(b"hello") + envelope.suffix
    assert len(body) == envelope.content_length
    assert json.loads(body) == {
        "success": True,
        "message": "Base64 retrieved successfully",
        "message_id": message_id,
        "mime_type": "image/jpeg",
        "media_type": "image",
        "base64": "aGVsbG8=",
    }


@pytest.mark.parametrize(
    ("actual", "declared", "expected"),
    [
        ("image/png", "image/jpeg", "image/png"),
        (None, "audio/ogg; codecs=opus", "audio/ogg; codecs=opus"),
        (None, None, "application/octet-stream"),
        ("text/html\r\nX-Evil: 1", None, "application/octet-stream"),
    ],
)
def test_mime_type_prefers_the_sniffed_one_and_refuses_junk(
    actual: str | None, declared: str | None, expected: str
) -> None:
    assert record(actual_mime=actual, declared_mime=declared).mime_type == expected


@pytest.mark.parametrize(
    "state", [MediaState.PENDING, MediaState.DOWNLOADING, MediaState.FAILED, MediaState.EXPIRED]
)
def test_only_stored_rows_are_available(state: MediaState) -> None:
    assert record().available
    with pytest.raises(ArchiveError) as caught:
        archive.require_available(record(state=state))
    assert (caught.value.status, caught.value.message) == (404, archive.NO_MEDIA)
    assert not record(storage_key=None).available


def test_metadata_never_reveals_the_storage_key() -> None:
    body = archive.metadata(record())
    assert "shop/image/x" not in json.dumps(body)
    assert body["state"] == "stored"


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("invoice.pdf", "invoice.pdf"),
        ("../../etc/passwd", "_.._etc_passwd"),
        ('a"b\r\nc;d.pdf', "a_b__c_d.pdf"),
        (None, "wamid.ABC.jpg"),
        ("...", "wamid.ABC.jpg"),
    ],
)
def test_download_filename_is_safe(filename: str | None, expected: str) -> None:
    assert archive.download_filename(record(filename=filename), ".jpg") == expected


def test_content_disposition_keeps_unicode_in_the_extended_form() -> None:
    header = archive.content_disposition("fätura.pdf")
    assert header.startswith('attachment; filename="f_tura.pdf"; ')
    assert header.endswith("filename*=UTF-8''f%C3%A4tura.pdf")


def test_etag_differs_per_representation() -> None:
    rec = record()
    assert archive.etag(rec, "raw") != archive.etag(rec, "b64")
    assert archive.etag(record(actual_sha256=None), "raw") is None


def test_413_message_names_the_raw_route() -> None:
    with pytest.raises(ArchiveError) as caught:
        archive.check_base64_size(record(size=11), 10, archive.raw_media_path("a b", "w/1"))
    assert caught.value.status == 413
    assert "/api/chat/media/a%20b?messageId=w%2F1" in caught.value.message


# --- tokens and the order of checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "authorization", "expected"),
    [
        ("abc", None, "abc"),
        (None, "Bearer xyz", "xyz"),
        (None, "bearer  xyz ", "xyz"),
        ("abc", "Bearer xyz", "abc"),
        ("abc", "xyz", "abc"),
        (None, "a1b2c3d4-e5f6", "a1b2c3d4-e5f6"),
        (None, " xyz ", "xyz"),
        (None, "Basic xyz", None),
        (None, "Token xyz", None),
        (None, "xyz extra", None),
        ("  ", "Bearer", None),
        (None, "bearer ", None),
        (None, "", None),
        (None, None, None),
    ],
)
def test_presented_token(
    token: str | None, authorization: str | None, expected: str | None
) -> None:
    assert archive.presented_token(token, authorization) == expected


@pytest.mark.parametrize(
    ("instance", "message_id", "message"),
    [
        (None, None, archive.INSTANCE_REQUIRED),
        ("  ", "x", archive.INSTANCE_REQUIRED),
        ("shop", None, archive.MESSAGE_ID_REQUIRED),
        ("shop", " ", archive.MESSAGE_ID_REQUIRED),
    ],
)
def test_parameters(instance: str | None, message_id: str | None, message: str) -> None:
    with pytest.raises(ArchiveError) as caught:
        archive.require_parameters(instance, message_id)
    assert (caught.value.status, caught.value.message) == (400, message)


def outcome(session: Session, token: str | None, name: str, message_id: str) -> tuple[int, str]:
    try:
        archive.find_record(session, token, name, message_id)
    except ArchiveError as exc:
        return exc.status, exc.message
    return 200, "ok"


def test_order_of_checks(session: Session) -> None:
    shop = make_instance(session)
    other = make_instance(session)
    account_token = accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT)
    shop_token = accounts.create_token(session, instance=shop.name)
    stored = make_media_item(session, shop, state=MediaState.STORED, storage_key="k", size=1)

    assert outcome(session, account_token, shop.name, stored.message_id) == (200, "ok")
    assert outcome(session, None, shop.name, "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, "forged", "nowhere", "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, shop_token, other.name, "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, shop_token, "nowhere", "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, account_token, "nowhere", "x") == (404, archive.INSTANCE_NOT_FOUND)
    assert outcome(session, account_token, shop.name, "x") == (404, archive.NO_MEDIA)
    shop.connected = False
    session.flush()
    assert outcome(session, account_token, shop.name, "x") == (503, archive.NOT_CONNECTED)
    assert outcome(session, shop_token, shop.name, stored.message_id) == (
        503,
        archive.NOT_CONNECTED,
    )


def test_control_characters_never_reach_the_database(session: Session) -> None:
    shop = make_instance(session)
    account_token = accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT)
    shop_token = accounts.create_token(session, instance=shop.name)
    stored = make_media_item(session, shop, state=MediaState.STORED, storage_key="k", size=1)
    sent: list[Any] = []

    def record_parameters(*args: Any) -> None:
        sent.append(args[3])  # (conn, cursor, statement, parameters, context, executemany)

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", record_parameters)
    try:
        # Trailing \x1f and \x85 would be stripped as whitespace; they still count.
        for bad in ("\x00", "\x01", "\x1b", "\x1f", "\x7f", "\x85"):
            for name, message_id in (
                (shop.name + bad, stored.message_id + bad),
                (bad + shop.name, bad + stored.message_id),
            ):
                # The usual order holds: the token, then the instance, then the row.
                assert outcome(session, "forged", name, "x") == (401, archive.INVALID_TOKEN)
                assert outcome(session, shop_token, name, "x") == (401, archive.INVALID_TOKEN)
                assert outcome(session, account_token, name, "x") == (
                    404,
                    archive.INSTANCE_NOT_FOUND,
                )
                assert outcome(session, account_token, shop.name, message_id) == (
                    404,
                    archive.NO_MEDIA,
                )
        shop.connected = False
        session.flush()
        assert outcome(session, account_token, shop.name, "wamid\x00") == (
            503,
            archive.NOT_CONNECTED,
        )
    finally:
        event.remove(engine, "before_cursor_execute", record_parameters)
    assert sent, "the token is still looked up"
    assert not any(re.search(r"[\x00-\x1f\x7f-\x9f]", repr_values(p)) for p in sent)


def repr_values(parameters: Any) -> str:
    values = parameters.values() if isinstance(parameters, dict) else parameters
    return "".join(v for v in values if isinstance(v, str))


def test_archive_error_carries_headers() -> None:
    assert ArchiveError(404, archive.NO_MEDIA).headers == {}
    error = ArchiveError(503, "Service unavailable", {"Retry-After": "5"})
    assert (error.status, error.message, error.headers) == (
        503,
        "Service unavailable",
        {"Retry-After": "5"},
    )


def test_account_token_of_another_account_sees_no_instance(session: Session) -> None:
    accounts.add_account(session, "elsewhere")
    theirs = make_instance(session, account="elsewhere")
    mine = accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT)
    assert outcome(session, mine, theirs.name, "x") == (404, archive.INSTANCE_NOT_FOUND)


# --- the rate limiter --------------------------------------------------------------------


def test_limiter_counts_per_token_and_shares_through_redis(
    redis_client: Any, redis_prefix: str
) -> None:
    one = RateLimiter.from_parts("3/minute", redis=redis_client, prefix=redis_prefix)
    two = RateLimiter.from_parts("3/minute", redis=redis_client, prefix=redis_prefix)
    try:
        decisions = [one.hit("h1"), two.hit("h1"), one.hit("h1"), two.hit("h1")]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert decisions[0].retry_after == 0
        assert 1 <= decisions[-1].retry_after <= 60
        assert one.hit("h2").allowed
        keys = sorted(key.decode() for key in redis_client.keys(f"{redis_prefix}:*"))
        assert [key.split("/")[1] for key in keys] == ["h1", "h2"]
        assert all(key.startswith(f"{redis_prefix}:api-rate:") for key in keys)
        assert all(0 < redis_client.ttl(key) <= 60 for key in keys)
    finally:
        for key in redis_client.keys(f"{redis_prefix}:*"):
            redis_client.delete(key)


def test_limiter_in_memory_without_redis() -> None:
    limiter = RateLimiter.from_parts("2/minute", redis=None, prefix="unused")
    assert [limiter.hit("h").allowed for _ in range(3)] == [True, True, False]
    assert limiter.hit("other").allowed


class Clock:
    """Stands in for the ``time`` module where the limiter and its storages read the time."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (rate_limit, limits.storage.memory, limits.storage.redis):
        monkeypatch.setattr(module, "time", clock)
    return clock


def assert_window_moves_hit_by_hit(limiter: RateLimiter, clock: Clock) -> None:
    """A 2/minute limit, hits at 0 s and 30 s."""
    assert limiter.hit("h").allowed
    clock.now += 30
    assert limiter.hit("h").allowed
    clock.now += 29
    refused = limiter.hit("h")
    # Refused until the first hit is a minute old, not until a window boundary.
    assert (refused.allowed, refused.remaining, refused.retry_after) == (False, 0, 1)
    clock.now += 2
    # Only the first hit left the window: one request fits (at 61 s), and the next waits
    # for the 30 s hit to age out.
    assert limiter.hit("h").allowed
    again = limiter.hit("h")
    assert (again.allowed, again.retry_after) == (False, 29)


def test_limiter_window_moves_hit_by_hit_in_memory(clock: Clock) -> None:
    limiter = RateLimiter.from_parts("2/minute", redis=None, prefix="unused")
    assert_window_moves_hit_by_hit(limiter, clock)


def test_limiter_window_moves_hit_by_hit_in_redis(
    clock: Clock, redis_client: Any, redis_prefix: str
) -> None:
    limiter = RateLimiter.from_parts("2/minute", redis=redis_client, prefix=redis_prefix)
    try:
        assert_window_moves_hit_by_hit(limiter, clock)
    finally:
        for key in redis_client.keys(f"{redis_prefix}:*"):
            redis_client.delete(key)


def test_limiter_fails_open_with_a_warning_when_redis_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = redis.Redis(unix_socket_path=str(tmp_path / "no-redis.sock"))
    limiter = RateLimiter(redis_storage(down, prefix="p"), "1/minute")
    with caplog.at_level(logging.WARNING, logger="ingest.rate_limit"):
        decisions = [limiter.hit("secret-hash") for _ in range(3)]
    assert all(d.allowed and d.remaining == 1 for d in decisions)
    assert len(caplog.records) == 3
    assert all("request allowed" in r.getMessage() for r in caplog.records)
    down.close()
