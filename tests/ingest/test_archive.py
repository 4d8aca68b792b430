"""The archive lookup rules without HTTP: checks and their order, base64 chunks, names."""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.orm import Session

from ingest import accounts, archive
from ingest.archive import ArchiveError, MediaRecord
from ingest.models import MediaState
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
    pending = make_media_item(session, shop)

    assert outcome(session, account_token, shop.name, stored.message_id) == (200, "ok")
    assert outcome(session, None, shop.name, "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, "forged", "nowhere", "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, shop_token, other.name, "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, shop_token, "nowhere", "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, account_token, "nowhere", "x") == (404, archive.INSTANCE_NOT_FOUND)
    assert outcome(session, account_token, shop.name, "x") == (404, archive.NO_MEDIA)
    shop.connected = False
    session.flush()
    # Disconnected: what is not stored yet is 503, still after the token and the instance.
    assert outcome(session, account_token, shop.name, "x") == (503, archive.NOT_CONNECTED)
    assert outcome(session, account_token, shop.name, pending.message_id) == (
        503,
        archive.NOT_CONNECTED,
    )
    assert outcome(session, "forged", shop.name, "x") == (401, archive.INVALID_TOKEN)
    assert outcome(session, shop_token, other.name, "x") == (401, archive.INVALID_TOKEN)
    # What is stored outlives the provider: served whatever the connection state.
    assert outcome(session, shop_token, shop.name, stored.message_id) == (200, "ok")
    assert outcome(session, account_token, shop.name, stored.message_id) == (200, "ok")


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
