"""The archive API over HTTP: the seed's contract, token reach, rate limit, streaming, ranges."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import delete, event, select
from sqlalchemy.exc import OperationalError

from ingest import accounts, archive
from ingest.media_rules import object_key
from ingest.models import ApiRateHit, ApiToken, MediaState, utcnow
from ingest.queues import RecordingScheduler
from ingest.services import Services
from ingest.settings import Settings
from ingest.storage import MemoryStorage, StorageError
from tests.factories import make_instance, make_media_item
from webhook.app import create_app

JPEG = b"\xff\xd8\xff\xe0" + os.urandom(3000)


@dataclass
class Archive:
    """An app over a database with two instances in one account and one in another."""

    services: Services
    client: FlaskClient
    instance: str
    sibling: str
    foreign: str
    account_token: str
    instance_token: str
    sibling_token: str
    foreign_account_token: str

    def store(self, data: bytes = JPEG, *, instance: str | None = None, **row: Any) -> str:
        """A stored media row whose bytes are in the app's storage; returns the message id."""
        digest = hashlib.sha256(data).hexdigest()
        with self.services.sessions.begin() as session:
            owner = accounts.get_instance(session, instance or self.instance)
            values: dict[str, Any] = {
                "state": MediaState.STORED,
                "size": len(data),
                "actual_sha256": digest,
                "actual_mime": "image/jpeg",
                "stored_at": utcnow(),
            }
            values.update(row)
            item = make_media_item(session, owner, **values)
            key = object_key(owner.name, item.media_type, item.media_id or item.message_id)
            item.storage_key = key
            item.storage_backend = self.services.storage.backend
            message_id = item.message_id
        self.services.storage.put(
            key,
            io.BytesIO(data),
            size=len(data),
            sha256=digest,
            content_type=str(values["actual_mime"]),
        )
        return message_id

    def row(self, *, instance: str | None = None, **values: Any) -> str:
        """A media row without bytes (pending, failed...); returns the message id."""
        with self.services.sessions.begin() as session:
            owner = accounts.get_instance(session, instance or self.instance)
            return make_media_item(session, owner, **values).message_id

    def get(self, path: str, token: str | None = None, **headers: str) -> Any:
        if token is not None:
            headers["token"] = token
        return self.client.get(path, headers=headers, buffered=True)


def build_archive(services: Services) -> Archive:
    with services.sessions.begin() as session:
        first = make_instance(session)
        second = make_instance(session)
        other_account = f"acct-{first.id}"
        accounts.add_account(session, other_account)
        third = make_instance(session, account=other_account)
        tokens = {
            "account_token": accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT),
            "instance_token": accounts.create_token(session, instance=first.name),
            "sibling_token": accounts.create_token(session, instance=second.name),
            "foreign_account_token": accounts.create_token(session, account=other_account),
        }
        names = (first.name, second.name, third.name)
    app = create_app(services=services, scheduler=RecordingScheduler())
    return Archive(services, app.test_client(), *names, **tokens)


@pytest.fixture
def api(services: Services) -> Archive:
    return build_archive(services)


@pytest.fixture
def lite(make_settings: Any, sqlite_url: str) -> Iterator[Archive]:
    """SQLite only: for tests about bodies and headers, where the database adds nothing."""
    services = Services.from_settings(make_settings(database_url=sqlite_url))
    yield build_archive(services)
    services.close()


def b64_path(instance: str, message_id: str) -> str:
    return f"/api/chat/base64/{instance}?messageId={message_id}"


def error_of(response: Any) -> tuple[int, str]:
    body = response.get_json()
    assert body["success"] is False
    assert set(body) == {"success", "error"}
    assert set(body["error"]) == {"message"}
    return response.status_code, body["error"]["message"]


# --- success -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["token", "bearer", "bare"])
def test_base64_success_body_is_exactly_the_seed(api: Archive, form: str) -> None:
    message_id = api.store()
    headers = {
        "token": {"token": api.instance_token},
        "bearer": {"Authorization": f"Bearer {api.instance_token}"},
        # The seed: `token` "yes (or `Authorization`)", with the bare token as its example.
        "bare": {"Authorization": api.instance_token},
    }[form]
    response = api.client.get(b64_path(api.instance, message_id), headers=headers, buffered=True)

    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body = json.loads(response.data)
    assert list(body) == ["success", "message", "message_id", "mime_type", "media_type", "base64"]
    assert body["success"] is True
    assert body["message"] == "Base64 retrieved successfully"
    assert body["message_id"] == message_id
    assert body["mime_type"] == "image/jpeg"
    assert body["media_type"] == "image"
    assert base64.b64decode(body["base64"], validate=True) == JPEG
    assert int(response.headers["Content-Length"]) == len(response.data)
    assert hashlib.sha256(JPEG).hexdigest() in response.headers["ETag"]


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 786431, 786432, 786433, 2 * 786432 + 5])
def test_base64_round_trips_every_length(lite: Archive, size: int) -> None:
    data = os.urandom(size)
    message_id = lite.store(data, media_type="document", actual_mime="application/pdf")
    response = lite.get(b64_path(lite.instance, message_id), lite.account_token)
    body = json.loads(response.data)
    assert base64.b64decode(body["base64"], validate=True) == data
    assert body["media_type"] == "document"
    assert int(response.headers["Content-Length"]) == len(response.data)


def test_base64_body_is_streamed_in_bounded_chunks(lite: Archive) -> None:
    data = os.urandom(5 * 1024 * 1024)
    message_id = lite.store(data, media_type="video", actual_mime="video/mp4")
    response = lite.client.get(
        b64_path(lite.instance, message_id), headers={"token": lite.account_token}, buffered=False
    )
    assert response.is_streamed
    chunks = list(response.response)
    response.close()
    # Nothing like the whole encoding (7 MB) ever exists as one piece.
    assert len(chunks) > 5
    assert max(len(chunk) for chunk in chunks) <= 1024 * 1024
    body = json.loads(b"".join(chunks))
    assert base64.b64decode(body["base64"]) == data


def test_mime_type_falls_back_to_the_declared_one(lite: Archive) -> None:
    message_id = lite.store(actual_mime=None, declared_mime="image/png")
    body = lite.get(b64_path(lite.instance, message_id), lite.account_token).get_json()
    assert body["mime_type"] == "image/png"


def test_base64_on_s3(
    make_settings: Any, sqlite_url: str, moto_server: Any, s3_storage_url: str
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        storage_url=s3_storage_url,
        s3_endpoint_url=moto_server.endpoint_url,
    )
    services = Services.from_settings(settings)
    try:
        api = build_archive(services)
        data = os.urandom(1024 * 1024 + 7)
        message_id = api.store(data, media_type="audio", actual_mime="audio/ogg")
        body = api.get(b64_path(api.instance, message_id), api.account_token).get_json()
        assert base64.b64decode(body["base64"]) == data
        assert body["media_type"] == "audio"

        raw = api.get(f"/api/chat/media/{api.instance}?messageId={message_id}", api.account_token)
        assert raw.data == data
        redirect = api.get(
            f"/api/chat/media/{api.instance}?messageId={message_id}&redirect=1", api.account_token
        )
        assert redirect.status_code == 302
        assert redirect.headers["Location"].startswith(moto_server.endpoint_url)
        assert redirect.headers["Cache-Control"] == "no-store"
    finally:
        services.close()


def test_base64_is_idempotent_and_conditional(lite: Archive) -> None:
    message_id = lite.store()
    first = lite.get(b64_path(lite.instance, message_id), lite.account_token)
    second = lite.get(b64_path(lite.instance, message_id), lite.account_token)
    assert first.data == second.data
    etag = first.headers["ETag"]
    assert "private" in first.headers["Cache-Control"]
    revalidated = lite.get(
        b64_path(lite.instance, message_id), lite.account_token, **{"If-None-Match": etag}
    )
    assert revalidated.status_code == 304
    assert revalidated.data == b""
    assert revalidated.headers["ETag"] == etag
    stale = lite.get(
        b64_path(lite.instance, message_id), lite.account_token, **{"If-None-Match": '"other"'}
    )
    assert stale.status_code == 200


# --- the seed's error table, each alone ------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/chat/base64/?messageId=wamid.X",
        "/api/chat/base64?messageId=wamid.X",
        "/api/chat/base64/%20?messageId=wamid.X",
    ],
)
def test_400_instance_name_is_required(api: Archive, path: str) -> None:
    assert error_of(api.get(path, api.account_token)) == (400, "Instance name is required")


@pytest.mark.parametrize("query", ["", "?messageId=", "?messageId=%20", "?other=1"])
def test_400_message_id_is_required(api: Archive, query: str) -> None:
    message_id = api.store()
    assert message_id
    response = api.get(f"/api/chat/base64/{api.instance}{query}", api.account_token)
    assert error_of(response) == (400, "messageId query parameter is required")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"token": "not-a-token"},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "not-a-token"},
        {"Authorization": "Bearer"},
        {"Authorization": "Token not-a-token"},
        {"token": ""},
    ],
)
def test_401_invalid_token(api: Archive, headers: dict[str, str]) -> None:
    message_id = api.store()
    response = api.client.get(b64_path(api.instance, message_id), headers=headers, buffered=True)
    assert error_of(response) == (401, "Invalid token")


def test_404_instance_not_found(api: Archive) -> None:
    response = api.get(b64_path("no-such-instance", "wamid.X"), api.account_token)
    assert error_of(response) == (404, "Instance not found")


@pytest.mark.parametrize(
    "row",
    [
        None,
        {"state": MediaState.PENDING},
        {"state": MediaState.DOWNLOADING},
        {"state": MediaState.FAILED, "failure_reason": "too_large"},
        {"state": MediaState.EXPIRED},
    ],
)
def test_404_message_not_found_or_no_media(api: Archive, row: dict[str, Any] | None) -> None:
    message_id = "wamid.UNKNOWN" if row is None else api.row(**row)
    response = api.get(b64_path(api.instance, message_id), api.account_token)
    assert error_of(response) == (404, "Message not found or no media available")


def test_404_when_the_object_is_missing_from_storage(lite: Archive) -> None:
    message_id = lite.store()
    for key in _storage_keys(lite):
        lite.services.storage.delete(key)
    response = lite.get(b64_path(lite.instance, message_id), lite.account_token)
    assert error_of(response) == (404, "Message not found or no media available")


@pytest.mark.parametrize("route", ["base64", "media"])
def test_a_held_etag_gets_404_not_304_when_the_object_is_gone(lite: Archive, route: str) -> None:
    message_id = lite.store()
    path = f"/api/chat/{route}/{lite.instance}?messageId={message_id}"
    etag = lite.get(path, lite.account_token).headers["ETag"]
    for key in _storage_keys(lite):
        lite.services.storage.delete(key)
    response = lite.get(path, lite.account_token, **{"If-None-Match": etag})
    assert error_of(response) == (404, "Message not found or no media available")


@pytest.mark.parametrize("route", ["base64", "media"])
def test_304_checks_the_object_exists_and_200_opens_it_once(
    lite: Archive, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = lite.store()
    path = f"/api/chat/{route}/{lite.instance}?messageId={message_id}"
    storage = lite.services.storage
    calls: list[str] = []
    real_head, real_open = storage.head, storage.open

    def head(key: str) -> Any:
        calls.append("head")
        return real_head(key)

    def open_(key: str, **kwargs: Any) -> Any:
        calls.append("open")
        return real_open(key, **kwargs)

    monkeypatch.setattr(storage, "head", head)
    monkeypatch.setattr(storage, "open", open_)
    etag = lite.get(path, lite.account_token).headers["ETag"]
    assert calls == ["open"]
    calls.clear()
    assert lite.get(path, lite.account_token, **{"If-None-Match": etag}).status_code == 304
    assert calls == ["head"]


def test_a_storage_outage_during_revalidation_is_503_with_retry_after(
    lite: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = lite.store()
    path = b64_path(lite.instance, message_id)
    etag = lite.get(path, lite.account_token).headers["ETag"]

    def head(key: str) -> Any:
        raise StorageError("store unreachable")

    monkeypatch.setattr(lite.services.storage, "head", head)
    response = lite.get(path, lite.account_token, **{"If-None-Match": etag})
    assert error_of(response) == (503, "Storage unavailable")
    assert response.headers["Retry-After"] == "5"


@pytest.mark.parametrize("route", ["base64", "find-message", "media"])
def test_503_database_unavailable_says_when_to_retry(
    lite: Archive, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_down(*args: Any) -> Any:
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(archive, "find_record", database_down)
    response = lite.get(f"/api/chat/{route}/{lite.instance}?messageId=x", lite.account_token)
    assert error_of(response) == (503, "Service unavailable")
    # Same as the storage outage, and as /openapi.json promises for every archive 503.
    assert response.headers["Retry-After"] == "5"


def test_503_instance_not_connected(api: Archive) -> None:
    pending = api.row(state=MediaState.PENDING)
    failed = api.row(state=MediaState.FAILED, failure_reason="provider_error")
    with api.services.sessions.begin() as session:
        accounts.set_connected(session, api.instance, False)
    for message_id in (pending, failed, "wamid.UNKNOWN"):
        for route in ("base64", "find-message", "media"):
            response = api.get(
                f"/api/chat/{route}/{api.instance}?messageId={message_id}", api.account_token
            )
            assert error_of(response) == (503, "Instance is not connected to WhatsApp")


@pytest.mark.parametrize("route", ["base64", "find-message", "media"])
def test_stored_media_is_served_whatever_the_connection_state(api: Archive, route: str) -> None:
    """The archive exists so that media outlives the provider: one 401 must not hide it."""
    message_id = api.store()
    path = f"/api/chat/{route}/{api.instance}?messageId={message_id}"
    before = api.get(path, api.instance_token)
    with api.services.sessions.begin() as session:
        accounts.set_connected(session, api.instance, False)
    after = api.get(path, api.instance_token)
    assert (before.status_code, after.status_code) == (200, 200)
    assert after.data == before.data
    etag = after.headers.get("ETag")
    if etag is not None:
        again = api.get(path, api.instance_token, **{"If-None-Match": etag})
        assert again.status_code == 304


# --- which error wins --------------------------------------------------------------------


def test_parameters_are_checked_before_the_token(api: Archive) -> None:
    assert error_of(api.get("/api/chat/base64/?messageId=", "bad"))[0] == 400
    assert error_of(api.get("/api/chat/base64/nowhere", None)) == (
        400,
        "messageId query parameter is required",
    )


def test_token_is_checked_before_the_instance(api: Archive) -> None:
    assert error_of(api.get(b64_path("nowhere", "wamid.X"), "bad")) == (401, "Invalid token")


def test_instance_connection_is_checked_before_the_message(api: Archive) -> None:
    with api.services.sessions.begin() as session:
        accounts.set_connected(session, api.instance, False)
    response = api.get(b64_path(api.instance, "wamid.UNKNOWN"), api.account_token)
    assert error_of(response)[0] == 503


@pytest.mark.parametrize("route", ["base64", "find-message", "media"])
@pytest.mark.parametrize("bad", ["%00", "%01", "%1F", "%7F", "%C2%85"])
def test_control_characters_are_not_found_not_a_server_error(
    api: Archive, route: str, bad: str
) -> None:
    """On PostgreSQL a NUL in a query parameter used to raise DataError (a 500)."""
    message_id = api.store()
    base = f"/api/chat/{route}"
    for name in (f"{api.instance}{bad}", f"{bad}{api.instance}"):
        # The checks keep the seed's order: parameters, token, instance, connection, message.
        assert error_of(api.get(f"{base}/{name}", api.account_token)) == (
            400,
            "messageId query parameter is required",
        )
        assert error_of(api.get(f"{base}/{name}?messageId={message_id}", "bad")) == (
            401,
            "Invalid token",
        )
        assert error_of(api.get(f"{base}/{name}?messageId={message_id}", api.instance_token)) == (
            401,
            "Invalid token",
        )
        assert error_of(api.get(f"{base}/{name}?messageId={message_id}", api.account_token)) == (
            404,
            "Instance not found",
        )
    for wamid in (f"{message_id}{bad}", f"{bad}{message_id}"):
        assert error_of(api.get(f"{base}/{api.instance}?messageId={wamid}", "bad")) == (
            401,
            "Invalid token",
        )
        assert error_of(api.get(f"{base}/{api.instance}?messageId={wamid}", api.account_token)) == (
            404,
            "Message not found or no media available",
        )
    with api.services.sessions.begin() as session:
        accounts.set_connected(session, api.instance, False)
    wamid = f"{message_id}{bad}"
    assert error_of(api.get(f"{base}/{api.instance}?messageId={wamid}", api.account_token)) == (
        503,
        "Instance is not connected to WhatsApp",
    )


def test_a_disconnected_instance_is_not_revealed_to_a_stranger(api: Archive) -> None:
    with api.services.sessions.begin() as session:
        accounts.set_connected(session, api.instance, False)
    assert error_of(api.get(b64_path(api.instance, "x"), api.sibling_token))[0] == 401
    assert error_of(api.get(b64_path(api.instance, "x"), api.foreign_account_token))[0] == 404


# --- token reach -------------------------------------------------------------------------


def test_account_token_reaches_every_instance_of_its_account(api: Archive) -> None:
    for name in (api.instance, api.sibling):
        message_id = api.store(instance=name)
        assert api.get(b64_path(name, message_id), api.account_token).status_code == 200


def test_instance_token_reaches_only_its_instance(api: Archive) -> None:
    own = api.store()
    other = api.store(instance=api.sibling)
    assert api.get(b64_path(api.instance, own), api.instance_token).status_code == 200
    assert error_of(api.get(b64_path(api.sibling, other), api.instance_token)) == (
        401,
        "Invalid token",
    )
    # An unknown name is no different from a known one that is not its own.
    assert error_of(api.get(b64_path("nowhere", own), api.instance_token)) == (
        401,
        "Invalid token",
    )


def test_account_token_does_not_see_other_accounts(api: Archive) -> None:
    foreign = api.store(instance=api.foreign)
    assert error_of(api.get(b64_path(api.foreign, foreign), api.account_token)) == (
        404,
        "Instance not found",
    )
    assert api.get(b64_path(api.foreign, foreign), api.foreign_account_token).status_code == 200


# --- 413 -------------------------------------------------------------------------------


def test_413_over_the_base64_ceiling_names_the_raw_route(
    make_settings: Any, sqlite_url: str
) -> None:
    services = Services.from_settings(make_settings(database_url=sqlite_url, base64_max_bytes=10))
    try:
        api = build_archive(services)
        message_id = api.store(b"x" * 11)
        status, message = error_of(api.get(b64_path(api.instance, message_id), api.account_token))
        assert status == 413
        assert f"/api/chat/media/{api.instance}?messageId={message_id}" in message
        small = api.store(b"y" * 10)
        assert api.get(b64_path(api.instance, small), api.account_token).status_code == 200
    finally:
        services.close()


# --- find-message ------------------------------------------------------------------------


def test_find_message_answers_for_any_state(api: Archive) -> None:
    pending = api.row(state=MediaState.PENDING, caption="hi", sender="15551234567")
    failed = api.row(state=MediaState.FAILED, failure_reason="too_large", media_type="video")
    stored = api.store(filename="photo.jpg")

    body = api.get(f"/api/chat/find-message/{api.instance}?messageId={pending}", api.account_token)
    assert body.status_code == 200
    data = body.get_json()
    assert data["success"] is True
    assert (data["state"], data["available"], data["caption"]) == ("pending", False, "hi")
    assert data["sender"] == "15551234567"

    data = api.get(
        f"/api/chat/find-message/{api.instance}?messageId={failed}", api.account_token
    ).get_json()
    assert (data["state"], data["failure_reason"], data["media_type"]) == (
        "failed",
        "too_large",
        "video",
    )

    data = api.get(
        f"/api/chat/find-message/{api.instance}?messageId={stored}", api.account_token
    ).get_json()
    assert data["available"] is True
    assert data["size"] == len(JPEG)
    assert data["sha256"] == hashlib.sha256(JPEG).hexdigest()
    assert data["filename"] == "photo.jpg"
    assert "storage_key" not in data


def test_find_message_errors_follow_the_same_table(api: Archive) -> None:
    base = "/api/chat/find-message"
    assert error_of(api.get(f"{base}/?messageId=x", api.account_token))[0] == 400
    assert error_of(api.get(f"{base}/{api.instance}", api.account_token))[0] == 400
    assert error_of(api.get(f"{base}/{api.instance}?messageId=x", "bad"))[0] == 401
    assert error_of(api.get(f"{base}/nowhere?messageId=x", api.account_token))[0] == 404
    assert error_of(api.get(f"{base}/{api.instance}?messageId=x", api.account_token)) == (
        404,
        "Message not found or no media available",
    )


# --- raw media ---------------------------------------------------------------------------


def media_path(api: Archive, message_id: str) -> str:
    return f"/api/chat/media/{api.instance}?messageId={message_id}"


def test_raw_media_headers(lite: Archive) -> None:
    message_id = lite.store(filename='../evil"\r\nname.jpg')
    response = lite.get(media_path(lite, message_id), lite.account_token)
    assert response.status_code == 200
    assert response.data == JPEG
    assert response.headers["Content-Type"] == "image/jpeg"
    assert int(response.headers["Content-Length"]) == len(JPEG)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"] == f'"{hashlib.sha256(JPEG).hexdigest()}"'
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith("attachment; ")
    assert "/" not in disposition.split("filename*=")[0]
    assert "\r" not in disposition and "\n" not in disposition


def test_raw_media_without_a_filename_gets_one_from_the_message(lite: Archive) -> None:
    message_id = lite.store()
    disposition = lite.get(media_path(lite, message_id), lite.account_token).headers[
        "Content-Disposition"
    ]
    assert message_id in disposition
    assert ".jpg" in disposition


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=100-", 100, None),
        ("bytes=-16", -16, None),
        # Range units compare case-insensitively (RFC 9110 section 14.1).
        ("Bytes=0-9", 0, 10),
        ("bytes=0-9,", 0, 10),
    ],
)
def test_single_range(lite: Archive, header: str, start: int, stop: int | None) -> None:
    message_id = lite.store()
    response = lite.get(media_path(lite, message_id), lite.account_token, Range=header)
    expected = JPEG[start:stop]
    assert response.status_code == 206
    assert response.data == expected
    first = start % len(JPEG)
    assert response.headers["Content-Range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(JPEG)}"
    )
    assert int(response.headers["Content-Length"]) == len(expected)


def test_unsatisfiable_range_is_416(lite: Archive) -> None:
    message_id = lite.store()
    response = lite.get(
        media_path(lite, message_id), lite.account_token, Range=f"bytes={len(JPEG)}-"
    )
    assert error_of(response)[0] == 416
    assert response.headers["Content-Range"] == f"bytes */{len(JPEG)}"


@pytest.mark.parametrize(
    "header",
    [
        # A suffix of no bytes is a valid range that nothing can satisfy (RFC 9110 14.1.1).
        "bytes=-0",
        "bytes=-00",
        "bytes=-0, -0",
        f"bytes={len(JPEG)}-,{len(JPEG) + 5}-9999",
        f"bytes=-0,{len(JPEG)}-",
    ],
)
def test_a_range_set_nothing_can_satisfy_is_416(lite: Archive, header: str) -> None:
    message_id = lite.store()
    response = lite.get(media_path(lite, message_id), lite.account_token, Range=header)
    assert error_of(response) == (416, "Requested range not satisfiable")
    assert response.headers["Content-Range"] == f"bytes */{len(JPEG)}"


@pytest.mark.parametrize("header", ["bytes=5-0", "bytes=0--0", "items=0-1", "bytes=", "bytes=-"])
def test_an_invalid_range_is_ignored(lite: Archive, header: str) -> None:
    message_id = lite.store()
    response = lite.get(media_path(lite, message_id), lite.account_token, Range=header)
    assert (response.status_code, response.data) == (200, JPEG)


def test_multiple_ranges_and_stale_if_range_get_the_whole_object(lite: Archive) -> None:
    message_id = lite.store()
    many = lite.get(media_path(lite, message_id), lite.account_token, Range="bytes=0-1,5-6")
    assert (many.status_code, many.data) == (200, JPEG)
    # One of several unsatisfiable: the others can be served, so not a 416.
    some = lite.get(media_path(lite, message_id), lite.account_token, Range="bytes=-0,0-1")
    assert (some.status_code, some.data) == (200, JPEG)
    stale = lite.get(
        media_path(lite, message_id),
        lite.account_token,
        Range="bytes=0-1",
        **{"If-Range": '"not-the-etag"'},
    )
    assert (stale.status_code, stale.data) == (200, JPEG)
    etag = many.headers["ETag"]
    fresh = lite.get(
        media_path(lite, message_id), lite.account_token, Range="bytes=0-1", **{"If-Range": etag}
    )
    assert (fresh.status_code, fresh.data) == (206, JPEG[:2])


def test_raw_media_conditional_304(lite: Archive) -> None:
    message_id = lite.store()
    etag = lite.get(media_path(lite, message_id), lite.account_token).headers["ETag"]
    response = lite.get(media_path(lite, message_id), lite.account_token, **{"If-None-Match": etag})
    assert response.status_code == 304
    assert response.data == b""


def test_redirect_is_ignored_on_local_storage(lite: Archive) -> None:
    message_id = lite.store()
    response = lite.get(media_path(lite, message_id) + "&redirect=1", lite.account_token)
    assert (response.status_code, response.data) == (200, JPEG)


def test_raw_media_errors_follow_the_same_table(api: Archive) -> None:
    pending = api.row(state=MediaState.PENDING)
    assert error_of(api.get("/api/chat/media?messageId=x", api.account_token))[0] == 400
    assert error_of(api.get(media_path(api, pending), None))[0] == 401
    assert error_of(api.get(media_path(api, pending), api.account_token))[0] == 404


# --- rate limit ------------------------------------------------------------------------


def test_rate_limit_is_shared_by_two_apps_through_redis(
    make_settings: Any, sqlite_url: str, redis_client: Any, redis_prefix: str
) -> None:
    settings: Settings = make_settings(
        database_url=sqlite_url, api_rate_limit="4/minute", redis_prefix=redis_prefix
    )
    first = Services.from_settings(settings, redis=redis_client)
    second = Services.from_settings(settings, redis=redis_client)
    try:
        api = build_archive(first)
        other = create_app(services=second, scheduler=RecordingScheduler()).test_client()
        message_id = api.store()
        path = b64_path(api.instance, message_id)
        headers = {"token": api.account_token}
        answers = [
            client.get(path, headers=headers, buffered=True).status_code
            for client in (api.client, other, api.client, other)
        ]
        assert answers == [200, 200, 200, 200]

        refused = other.get(path, headers=headers)
        status, message = error_of(refused)
        assert (status, message) == (429, "Too many requests")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert error_of(api.client.get(path, headers=headers, buffered=True))[0] == 429
        # The header form does not matter: the limit belongs to the token.
        bearer = {"Authorization": f"Bearer {api.account_token}"}
        assert api.client.get(path, headers=bearer, buffered=True).status_code == 429
        bare = {"Authorization": api.account_token}
        assert api.client.get(path, headers=bare, buffered=True).status_code == 429
        # Another token has its own budget.
        assert api.get(path, api.instance_token).status_code == 200

        keys = [key.decode() for key in redis_client.keys(f"{redis_prefix}:*")]
        assert keys
        assert all(api.account_token not in key for key in keys)
        assert any(accounts.hash_secret(api.account_token) in key for key in keys)
    finally:
        for key in redis_client.keys(f"{redis_prefix}:*"):
            redis_client.delete(key)
        first.close()
        second.close()


def test_rate_limit_is_shared_by_two_apps_without_redis(
    make_settings: Any, database_url: str
) -> None:
    """The embedded default too: two web processes on one database share one window."""
    settings: Settings = make_settings(database_url=database_url, api_rate_limit="4/minute")
    first = Services.from_settings(settings)
    second = Services.from_settings(settings)
    try:
        api = build_archive(first)
        other = create_app(services=second, scheduler=RecordingScheduler()).test_client()
        message_id = api.store()
        path = b64_path(api.instance, message_id)
        headers = {"token": api.account_token}
        answers = [
            client.get(path, headers=headers, buffered=True).status_code
            for client in (api.client, other, api.client, other, api.client, other)
        ]
        assert answers == [200, 200, 200, 200, 429, 429]
        assert api.get(path, api.instance_token).status_code == 200
    finally:
        first.close()
        second.close()


def test_a_token_s_own_rate_limit_applies_to_it(make_settings: Any, database_url: str) -> None:
    services = Services.from_settings(
        make_settings(database_url=database_url, api_rate_limit="2/minute")
    )
    try:
        api = build_archive(services)
        with services.sessions.begin() as session:
            fast = accounts.create_token(session, instance=api.instance, rate_limit="5/minute")
        message_id = api.store()
        path = b64_path(api.instance, message_id)
        answers = [api.get(path, fast) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 5 + [429]
        assert {a.headers["X-RateLimit-Limit"] for a in answers} == {"5"}
        assert [a.headers["X-RateLimit-Remaining"] for a in answers] == [
            "4",
            "3",
            "2",
            "1",
            "0",
            "0",
        ]
        # Tokens without a limit of their own keep the deployment's.
        plain = [api.get(path, api.instance_token) for _ in range(3)]
        assert [a.status_code for a in plain] == [200, 200, 429]
        assert plain[0].headers["X-RateLimit-Limit"] == "2"
    finally:
        services.close()


def test_every_answer_says_when_the_window_resets(lite: Archive) -> None:
    stored = lite.store()
    good = b64_path(lite.instance, stored)
    now = time.time()
    answers = {
        "200": lite.get(good, lite.account_token),
        "304": None,
        "400 with a token": lite.get("/api/chat/base64/?messageId=x", lite.account_token),
        "400 without": lite.get("/api/chat/base64/?messageId=x"),
        "401 forged": lite.get(good, "forged"),
        "401 without": lite.get(good),
        "404": lite.get(b64_path(lite.instance, "wamid.NONE"), lite.account_token),
        "media 200": lite.get(media_path(lite, stored), lite.account_token),
        "find 200": lite.get(
            f"/api/chat/find-message/{lite.instance}?messageId={stored}", lite.account_token
        ),
    }
    answers["304"] = lite.get(
        good, lite.account_token, **{"If-None-Match": answers["200"].headers["ETag"]}
    )
    # A window opens at a request, after `now`, and its end is rounded up to the second: the
    # latest reset is a minute and a second after the last request, not after `now`.
    done = time.time()
    for name, response in answers.items():
        assert response is not None
        assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(
            response.headers.keys()
        ), name
        reset = response.headers["X-RateLimit-Reset"]
        assert reset.isdigit(), (name, reset)
        assert now - 1 <= int(reset) <= done + 61, (name, reset)
    assert answers["304"].status_code == 304
    assert answers["404"].status_code == 404


def test_a_429_says_when_the_window_resets(make_settings: Any, sqlite_url: str) -> None:
    services = Services.from_settings(
        make_settings(database_url=sqlite_url, api_rate_limit="1/minute")
    )
    try:
        api = build_archive(services)
        path = b64_path(api.instance, api.store())
        first = api.get(path, api.account_token)
        refused = api.get(path, api.account_token)
        assert (first.status_code, refused.status_code) == (200, 429)
        reset = int(refused.headers["X-RateLimit-Reset"])
        assert reset == int(first.headers["X-RateLimit-Reset"])
        assert abs(reset - (time.time() + int(refused.headers["Retry-After"]))) <= 2
        assert refused.headers["X-RateLimit-Remaining"] == "0"
    finally:
        services.close()


def test_error_bodies_keep_the_seed_s_key_order(lite: Archive) -> None:
    stored = lite.store()
    for response in (
        lite.get(b64_path(lite.instance, "wamid.NONE"), lite.account_token),
        lite.get(b64_path(lite.instance, stored), "forged"),
        lite.get("/api/chat/base64/?messageId=x", lite.account_token),
        lite.client.post(b64_path(lite.instance, stored)),
    ):
        assert response.status_code >= 400
        assert list(json.loads(response.data)) == ["success", "error"]
    found = lite.get(
        f"/api/chat/find-message/{lite.instance}?messageId={stored}", lite.account_token
    )
    assert list(json.loads(found.data))[:3] == ["success", "message", "instance"]


def test_rate_limit_covers_every_archive_route_without_redis(
    make_settings: Any, sqlite_url: str
) -> None:
    services = Services.from_settings(
        make_settings(database_url=sqlite_url, api_rate_limit="2/minute")
    )
    try:
        api = build_archive(services)
        message_id = api.store()
        routes = [
            b64_path(api.instance, message_id),
            f"/api/chat/find-message/{api.instance}?messageId={message_id}",
            media_path(api, message_id),
        ]
        statuses = [api.get(path, api.account_token).status_code for path in routes]
        assert statuses == [200, 200, 429]
        # Outside the archive API nothing is limited.
        assert (
            api.client.get(
                "/healthz", headers={"token": api.account_token}, buffered=True
            ).status_code
            == 200
        )
    finally:
        services.close()


def test_storage_memory_backend_serves_too(lite: Archive) -> None:
    lite.services.storage = MemoryStorage()
    message_id = lite.store(b"\x00\x01\x02")
    body = lite.get(b64_path(lite.instance, message_id), lite.account_token).get_json()
    assert body["base64"] == "AAEC"


def _storage_keys(api: Archive) -> Iterator[str]:
    from sqlalchemy import select

    from ingest.models import MediaItem

    with api.services.sessions() as session:
        for key in session.scalars(select(MediaItem.storage_key)):
            if key:
                yield key


def test_head_answers_the_headers_without_a_body(lite: Archive) -> None:
    message_id = lite.store()
    full = lite.get(b64_path(lite.instance, message_id), lite.account_token)
    head = lite.client.head(
        b64_path(lite.instance, message_id), headers={"token": lite.account_token}, buffered=True
    )
    assert head.status_code == 200
    assert head.data == b""
    assert head.headers["Content-Length"] == full.headers["Content-Length"]


# --- failed authentications ----------------------------------------------------------------

GUESSER = "198.51.100.7"


def guess(
    api: Archive, path: str, *, address: str = GUESSER, token: str | None = None, **headers: str
) -> Any:
    """A request from ``address`` with ``token``, by default a fresh random (wrong) one."""
    headers["token"] = token or secrets.token_urlsafe(32)
    return api.client.get(
        path, headers=headers, environ_base={"REMOTE_ADDR": address}, buffered=True
    )


def _limited_archive(make_settings: Any, database_url: str, **settings: Any) -> Archive:
    services = Services.from_settings(make_settings(database_url=database_url, **settings))
    return build_archive(services)


@pytest.fixture
def guarded(make_settings: Any, database_url: str) -> Iterator[Archive]:
    """3 failed authentications a minute per client address, 1000 for the deployment."""
    api = _limited_archive(
        make_settings,
        database_url,
        auth_failure_rate_limit="3/minute",
        auth_failure_global_rate_limit="1000/minute",
    )
    yield api
    api.services.close()


@pytest.fixture
def token_lookups(guarded: Archive) -> Iterator[list[str]]:
    """Every SQL statement of ``guarded``'s app that reads the token table, as it runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "api_tokens" in statement:
            seen.append(statement)

    event.listen(guarded.services.engine, "before_cursor_execute", record)
    yield seen
    event.remove(guarded.services.engine, "before_cursor_execute", record)


def test_guessed_tokens_cost_the_guesser_not_the_database_without_redis(
    make_settings: Any, database_url: str, redis_prefix: str
) -> None:
    """Finding: 500 random tokens gave 500 x 401, each one a token lookup (and, with Redis,
    a new key)."""
    settings = make_settings(database_url=database_url, auth_failure_rate_limit="5/minute")
    _guess_thirty_tokens(settings, None, redis_prefix)


def test_guessed_tokens_cost_the_guesser_not_the_database_with_redis(
    make_settings: Any, sqlite_url: str, redis_client: Any, redis_prefix: str
) -> None:
    settings = make_settings(
        database_url=sqlite_url, redis_prefix=redis_prefix, auth_failure_rate_limit="5/minute"
    )
    _guess_thirty_tokens(settings, redis_client, redis_prefix)


def _guess_thirty_tokens(settings: Settings, redis_client: Any, prefix: str) -> None:
    services = Services.from_settings(settings, redis=redis_client)
    lookups: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "api_tokens" in statement:
            lookups.append(statement)

    try:
        api = build_archive(services)
        path = b64_path(api.instance, api.store())
        event.listen(services.engine, "before_cursor_execute", record)
        tokens = [secrets.token_urlsafe(32) for _ in range(30)]
        now = time.time()
        answers = [guess(api, path, token=token) for token in tokens]
        # The window starts at the fifth failure, somewhere in between: a slow machine took
        # over a second for these thirty requests.
        done = time.time()

        assert [a.status_code for a in answers] == [401] * 5 + [429] * 25
        assert [a.headers["X-RateLimit-Remaining"] for a in answers[:5]] == [
            "4",
            "3",
            "2",
            "1",
            "0",
        ]
        for refused in answers[5:]:
            assert error_of(refused) == (429, "Too many failed authentications")
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
            assert refused.headers["X-RateLimit-Limit"] == "5"
            assert refused.headers["X-RateLimit-Remaining"] == "0"
            assert now <= int(refused.headers["X-RateLimit-Reset"]) <= done + 61
        # One lookup per counted failure, none once the client is refused.
        assert len(lookups) == 5

        # The store holds the client's and the deployment's windows: nothing per token.
        hashes = [accounts.hash_secret(token) for token in tokens]
        if redis_client is not None:
            keys = [key.decode() for key in redis_client.keys(f"{prefix}:*")]
            assert all(key.startswith(f"{prefix}:auth-failures:") for key in keys)
        else:
            with services.sessions() as session:
                keys = list(session.scalars(select(ApiRateHit.rate_key).distinct()))
        assert len(keys) == 2
        assert any(GUESSER in key for key in keys)
        assert not any(secret in key for key in keys for secret in (*tokens, *hashes))
    finally:
        event.remove(services.engine, "before_cursor_execute", record)
        if redis_client is not None:
            for key in redis_client.keys(f"{prefix}:*"):
                redis_client.delete(key)
        services.close()


def test_a_successful_request_does_not_spend_failures(guarded: Archive) -> None:
    path = b64_path(guarded.instance, guarded.store())
    ok = [guess(guarded, path, token=guarded.instance_token) for _ in range(5)]
    assert [a.status_code for a in ok] == [200] * 5
    assert [guess(guarded, path).status_code for _ in range(2)] == [401, 401]
    assert guess(guarded, path, token=guarded.instance_token).status_code == 200
    assert guess(guarded, path).status_code == 401
    assert guess(guarded, path).status_code == 429


def test_failures_are_charged_to_the_connection_s_address_not_x_forwarded_for(
    guarded: Archive,
) -> None:
    path = b64_path(guarded.instance, "wamid.X")
    other = "203.0.113.20"
    assert [guess(guarded, path).status_code for _ in range(3)] == [401, 401, 401]
    assert guess(guarded, path).status_code == 429
    # Any client can write X-Forwarded-For: it moves nothing.
    assert guess(guarded, path, **{"X-Forwarded-For": other}).status_code == 429
    assert guess(guarded, path, address=other).status_code == 401
    assert guess(guarded, path, address=other, **{"X-Forwarded-For": GUESSER}).status_code == 401
    assert guess(guarded, path, address=other).status_code == 401
    assert guess(guarded, path, address=other).status_code == 429


def test_an_ipv6_client_is_one_client_across_its_64(guarded: Archive) -> None:
    path = b64_path(guarded.instance, "wamid.X")
    statuses = [
        guess(guarded, path, address=f"2001:db8:0:7::{n:x}").status_code for n in range(1, 5)
    ]
    assert statuses == [401, 401, 401, 429]
    assert guess(guarded, path, address="2001:db8:0:8::1").status_code == 401


def test_the_deployment_wide_limit_refuses_every_address_once_spent(
    make_settings: Any, sqlite_url: str
) -> None:
    api = _limited_archive(
        make_settings,
        sqlite_url,
        auth_failure_rate_limit="100/minute",
        auth_failure_global_rate_limit="3/minute",
    )
    try:
        path = b64_path(api.instance, "wamid.X")
        statuses = [guess(api, path, address=f"192.0.2.{n}").status_code for n in range(1, 4)]
        assert statuses == [401, 401, 401]
        refused = guess(api, path, address="192.0.2.99")
        assert error_of(refused) == (429, "Too many failed authentications")
        assert refused.headers["X-RateLimit-Limit"] == "3"
    finally:
        api.services.close()


def test_a_token_already_served_keeps_working_while_its_address_is_refused(
    guarded: Archive, token_lookups: list[str]
) -> None:
    """A guesser behind the same address (or a flood spending the deployment's budget) does
    not lock out a client this process has already served: its token is known here, so
    nothing is looked up to find it, and its own rate limit still applies."""
    path = b64_path(guarded.instance, guarded.store())
    assert guess(guarded, path, token=guarded.account_token).status_code == 200
    assert [guess(guarded, path).status_code for _ in range(4)] == [401, 401, 401, 429]
    assert guess(guarded, path, token=guarded.account_token).status_code == 200
    # A valid token this process has not seen is not told apart from a guess.
    before = len(token_lookups)
    assert guess(guarded, path, token=guarded.instance_token).status_code == 429
    assert len(token_lookups) == before
    assert guess(guarded, path, token=guarded.instance_token, address="192.0.2.1").status_code == (
        200
    )
    assert len(token_lookups) > before


def test_a_revoked_token_counts_as_a_failed_authentication(guarded: Archive) -> None:
    path = b64_path(guarded.instance, guarded.store())
    assert guess(guarded, path, token=guarded.instance_token).status_code == 200
    with guarded.services.sessions.begin() as session:
        session.execute(
            delete(ApiToken).where(
                ApiToken.token_hash == accounts.hash_secret(guarded.instance_token)
            )
        )
    statuses = [guess(guarded, path, token=guarded.instance_token).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]


def test_an_instance_token_asking_for_another_instance_spends_no_failure(guarded: Archive) -> None:
    """A real token outside its reach is a 401 too, but not a guess: its own rate limit
    bounds it, and a client with a wrong configuration keeps its failures."""
    path = b64_path(guarded.sibling, "wamid.X")
    statuses = [guess(guarded, path, token=guarded.instance_token).status_code for _ in range(5)]
    assert statuses == [401] * 5
    assert guess(guarded, path).status_code == 401


def test_requests_missing_a_parameter_look_nothing_up(
    guarded: Archive, token_lookups: list[str]
) -> None:
    for _ in range(5):
        assert guess(guarded, "/api/chat/base64/?messageId=x").status_code == 400
        assert guess(guarded, f"/api/chat/base64/{guarded.instance}").status_code == 400
    assert token_lookups == []
    assert guess(guarded, b64_path(guarded.instance, "x")).status_code == 401
    assert len(token_lookups) == 1
