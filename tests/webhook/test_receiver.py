"""The receiver end to end against the Flask app, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError

from ingest.intake import SIGNATURE_HEADER, sign
from ingest.models import Instance, MediaState
from ingest.queues import RecordingScheduler, SchedulerUnavailable
from ingest.services import Services
from ingest.wake_relay import relay_pass
from tests.webhook.conftest import (
    TestInstance,
    change,
    encode,
    envelope,
    media_message,
    status_update,
    text_message,
    webhook_documents,
)
from webhook.app import create_app

# --- handshake ---------------------------------------------------------------------------


def handshake(client: FlaskClient, path: str, **params: str) -> Any:
    query = {"hub.mode": "subscribe", "hub.challenge": "1158201444", **params}
    return client.get(path, query_string=query)


def test_handshake_echoes_challenge_as_plain_text(client: Any, instance: TestInstance) -> None:
    response = handshake(client, f"/webhook/{instance.name}", **{"hub.verify_token": "verify-me"})
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "1158201444"


def test_handshake_without_instance_accepts_any_instances_token(
    client: Any, add_instance: Any
) -> None:
    add_instance(verify_token="first-token")
    add_instance(verify_token="second-token")
    ok = handshake(client, "/webhook", **{"hub.verify_token": "second-token"})
    assert ok.status_code == 200
    assert ok.get_data(as_text=True) == "1158201444"
    assert handshake(client, "/webhook", **{"hub.verify_token": "third"}).status_code == 403


@pytest.mark.parametrize(
    "params",
    [
        {"hub.verify_token": "wrong"},
        {"hub.verify_token": "verify-me", "hub.mode": "unsubscribe"},
        {"hub.verify_token": "verify-me", "hub.challenge": ""},
        {},
    ],
    ids=["wrong-token", "wrong-mode", "no-challenge", "no-token"],
)
def test_handshake_refuses_anything_else(
    client: Any, instance: TestInstance, params: dict[str, str]
) -> None:
    response = handshake(client, f"/webhook/{instance.name}", **params)
    assert response.status_code == 403
    assert response.get_json() == {"success": False, "error": {"message": "Verification failed"}}


def test_handshake_token_of_another_instance_is_refused(client: Any, add_instance: Any) -> None:
    first = add_instance(verify_token="first-token")
    add_instance(verify_token="second-token")
    path = f"/webhook/{first.name}"
    assert handshake(client, path, **{"hub.verify_token": "second-token"}).status_code == 403
    assert handshake(client, "/webhook/nobody", **{"hub.verify_token": "x"}).status_code == 403


# --- signatures ----------------------------------------------------------------------------


def non_ascii_body(instance: TestInstance) -> bytes:
    message = media_message("image", caption="café ☕ — 写真 📷")
    return encode(envelope(change(instance.phone_number_id, [message])))


def test_signature_over_exact_bytes_with_non_ascii_caption(
    post: Any, instance: TestInstance, rows: Any
) -> None:
    body = non_ascii_body(instance)
    assert b"\\u2615" in body  # escaped, as Meta sends it
    response = post(body)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {
        "success": True,
        "message": "Webhook accepted",
        "media": 1,
        "new": 1,
    }
    assert rows()[0].caption == "café ☕ — 写真 📷"


def flip_one_byte(body: bytes) -> bytes:
    index = body.index(b"caf")
    return body[:index] + b"C" + body[index + 1 :]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda body, sig: (flip_one_byte(body), sig), id="flipped-byte"),
        pytest.param(lambda body, sig: (body, "sha1=" + sig[7:]), id="wrong-prefix"),
        pytest.param(lambda body, sig: (body, sig[7:]), id="no-prefix"),
        pytest.param(lambda body, sig: (body, ""), id="missing-header"),
        pytest.param(
            lambda body, sig: (json.dumps(json.loads(body), ensure_ascii=False).encode(), sig),
            id="re-serialised-json",
        ),
        pytest.param(lambda body, sig: (body, sign(body, "other-secret")), id="wrong-secret"),
    ],
)
def test_signature_rejections_write_nothing(
    client: FlaskClient, instance: TestInstance, count_rows: Any, scheduler: Any, tamper: Any
) -> None:
    original = non_ascii_body(instance)
    body, signature = tamper(original, sign(original, "app-secret"))
    headers = {SIGNATURE_HEADER: signature} if signature else {}
    for path in ("/webhook", f"/webhook/{instance.name}"):
        response = client.post(path, data=body, headers=headers, content_type="application/json")
        assert response.status_code == 401
        assert response.get_json() == {"success": False, "error": {"message": "Invalid signature"}}
    assert count_rows() == 0
    assert scheduler.jobs == []


def test_an_instance_allowed_unsigned_webhooks_accepts_unsigned_posts(
    post: Any, add_instance: Any, count_rows: Any
) -> None:
    open_instance = add_instance(app_secret=None, allow_unsigned=True)
    body = encode(envelope(change(open_instance.phone_number_id, [media_message()])))
    assert post(body, secret=None).status_code == 200
    assert count_rows() == 1


def test_an_instance_with_no_check_and_no_flag_refuses_unsigned_posts(
    post: Any, add_instance: Any, count_rows: Any, services: Services
) -> None:
    """A row from before every instance had to authenticate (no secret, no explicit flag)
    takes nothing: whoever could post would spend its provider key."""
    closed = add_instance(app_secret=None, allow_unsigned=True)
    with services.sessions.begin() as session:  # as migration 0005 leaves such a row
        session.execute(
            update(Instance).where(Instance.id == closed.id).values(allow_unsigned=False)
        )
    body = encode(envelope(change(closed.phone_number_id, [media_message()])))
    assert post(body, secret=None).status_code == 401
    assert count_rows() == 0


def test_360dialog_shared_secret_header(post: Any, add_instance: Any, count_rows: Any) -> None:
    d360 = add_instance(
        provider="360dialog",
        app_secret=None,
        webhook_secret_header="X-D360-Secret",
        webhook_secret="s3cret-value",
    )
    body = encode(envelope(change(d360.phone_number_id, [media_message()])))
    path = f"/webhook/{d360.name}"
    assert post(body, secret=None, path=path).status_code == 401
    wrong = {"X-D360-Secret": "guess"}
    assert post(body, secret=None, path=path, headers=wrong).status_code == 401
    assert count_rows() == 0
    right = {"X-D360-Secret": "s3cret-value"}
    assert post(body, secret=None, path=path, headers=right).status_code == 200
    assert count_rows() == 1


def test_global_route_requires_every_routed_instances_signature(
    post: Any, add_instance: Any, count_rows: Any
) -> None:
    first = add_instance(app_secret="secret-one")
    second = add_instance(app_secret="secret-two")
    body = encode(
        envelope(
            change(first.phone_number_id, [media_message()]),
            change(second.phone_number_id, [media_message()]),
        )
    )
    assert post(body, secret="secret-one").status_code == 401
    assert count_rows() == 0


# --- parsing and recording -----------------------------------------------------------------


def test_multi_entry_payload_records_each_media_message_once(
    post: Any, add_instance: Any, rows: Any, scheduler: Any
) -> None:
    first = add_instance()
    second = add_instance()
    body = encode(
        envelope(
            change(first.phone_number_id, [media_message("image"), text_message()]),
            change(second.phone_number_id, [media_message("document"), media_message("audio")]),
            change(first.phone_number_id, None, statuses=[status_update(), status_update()]),
            change(first.phone_number_id, [media_message("video")]),
            entries=3,
        )
    )
    response = post(body)
    assert response.status_code == 200
    assert response.get_json()["media"] == 4
    assert response.get_json()["new"] == 4
    stored = rows()
    by_instance = {(row.instance_id, row.media_type) for row in stored}
    assert by_instance == {
        (first.id, "image"),
        (first.id, "video"),
        (second.id, "document"),
        (second.id, "audio"),
    }
    # Committed for the relay: the receiver publishes nothing itself.
    assert [row.enqueued_at for row in stored] == [None] * 4
    assert scheduler.jobs == []

    again = post(body)
    assert again.get_json() == {
        "success": True,
        "message": "Webhook accepted",
        "media": 4,
        "new": 0,
    }
    assert len(rows()) == 4


@pytest.mark.parametrize("kind", ["image", "video", "audio", "document", "sticker"])
def test_every_media_type_is_recorded_pending_with_its_fields(
    post: Any, instance: TestInstance, rows: Any, scheduler: Any, kind: str
) -> None:
    base64_sha = "q" * 43 + "="  # 32 bytes in base64: normalised to hex
    extra: dict[str, Any] = {"animated": True} if kind == "sticker" else {}
    message = media_message(kind, sha256=base64_sha, url=SIGNED_URL, **extra)
    response = post(encode(envelope(change(instance.phone_number_id, [message]))))
    assert response.status_code == 200
    (row,) = rows()
    media = message[kind]
    assert row.state == MediaState.PENDING
    assert row.media_type == kind
    assert row.message_id == message["id"]
    assert row.media_id == media["id"]
    assert row.declared_mime == media["mime_type"]
    assert row.declared_sha256 is not None and len(row.declared_sha256) == 64
    assert row.caption == media.get("caption")
    assert row.filename == media.get("filename")
    assert row.voice is (kind == "audio")
    assert row.animated is (kind == "sticker")
    assert row.sender == "15551234567"
    assert row.message_timestamp == datetime.fromtimestamp(int(message["timestamp"]), tz=UTC)
    assert row.download_url == SIGNED_URL
    # Both windows run from when the message was sent (a moment before it arrived).
    issued = min(row.message_timestamp, row.received_at)
    assert row.url_deadline == issued + timedelta(minutes=5)
    assert row.expires_at == issued + timedelta(days=7)
    assert row.enqueued_at is None  # the relay in the workers wakes it
    assert scheduler.jobs == []


def test_provider_error_events_become_failed_rows_without_jobs(
    post: Any, instance: TestInstance, rows: Any, scheduler: Any
) -> None:
    unsupported = {
        "from": "15551234567",
        "id": "wamid.UNSUPPORTED",
        "timestamp": "1718000000",
        "type": "unsupported",
        "unsupported": {"type": "video"},
        "errors": [{"code": 131051, "title": "Message type unknown"}],
    }
    too_large = media_message("document", message_id="wamid.HUGE")
    too_large["errors"] = [
        {"code": 131052, "title": "Media file too large", "error_data": {"details": "101 MB"}}
    ]
    value_level = change(
        instance.phone_number_id,
        [media_message("image", message_id="wamid.VALUE")],
        errors=[{"code": 131000, "title": "Something went wrong"}],
    )
    body = encode(envelope(change(instance.phone_number_id, [unsupported, too_large]), value_level))
    response = post(body)
    assert response.status_code == 200
    assert response.get_json()["new"] == 3
    failed = {row.message_id: row for row in rows()}
    assert {row.state for row in failed.values()} == {MediaState.FAILED}
    assert failed["wamid.UNSUPPORTED"].media_type == "video"
    assert failed["wamid.UNSUPPORTED"].failure_reason == "provider_error"
    assert failed["wamid.UNSUPPORTED"].last_error == "131051: Message type unknown"
    assert failed["wamid.HUGE"].failure_reason == "too_large"
    assert failed["wamid.HUGE"].last_error == "131052: Media file too large"
    assert failed["wamid.VALUE"].last_error == "131000: Something went wrong"
    assert all(row.download_url is None for row in failed.values())
    assert scheduler.jobs == []


def test_statuses_and_text_are_acknowledged_and_ignored(
    post: Any, instance: TestInstance, count_rows: Any
) -> None:
    body = encode(
        envelope(change(instance.phone_number_id, [text_message()], statuses=[status_update()]))
    )
    response = post(body)
    assert response.status_code == 200
    assert response.get_json() == {
        "success": True,
        "message": "Webhook accepted",
        "media": 0,
        "new": 0,
    }
    assert count_rows() == 0


def test_disconnected_instance_still_records(
    post: Any, instance: TestInstance, services: Services, count_rows: Any
) -> None:
    from ingest.accounts import set_connected

    with services.sessions.begin() as session:
        set_connected(session, instance.name, False)
    body = encode(envelope(change(instance.phone_number_id, [media_message()])))
    assert post(body).status_code == 200
    assert count_rows() == 1


def test_unknown_phone_number_ids_beside_known_ones_are_skipped(
    post: Any, instance: TestInstance, rows: Any, caplog: pytest.LogCaptureFixture
) -> None:
    body = encode(
        envelope(
            change("999999999", [media_message()]),
            change(instance.phone_number_id, [media_message()]),
        )
    )
    with caplog.at_level(logging.WARNING, logger="webhook.receiver"):
        response = post(body)
    assert response.status_code == 200
    assert [row.instance_id for row in rows()] == [instance.id]
    assert "unknown phone number" in caplog.text


# --- bad input -----------------------------------------------------------------------------


def assert_error(response: Any, status: int) -> None:
    assert response.status_code == status
    document = response.get_json()
    assert document["success"] is False
    assert isinstance(document["error"]["message"], str)
    assert "Traceback" not in response.get_data(as_text=True)


def test_bad_requests_answer_in_the_seed_shape_and_write_nothing(
    post: Any, instance: TestInstance, add_instance: Any, count_rows: Any, scheduler: Any
) -> None:
    good = encode(envelope(change(instance.phone_number_id, [media_message()])))
    assert_error(post(b'{"object": "whatsapp_business_account", "entry": ['), 400)
    assert_error(post(b"\xff\xfe not utf-8"), 400)
    assert_error(post(b'{"entry": {}}'), 400)
    assert_error(post(good, content_type="text/plain"), 415)
    assert_error(post(good, content_type="application/x-www-form-urlencoded"), 415)
    unknown = encode(envelope(change("424242", [media_message()])))
    assert_error(post(unknown), 404)
    assert_error(post(good, path="/webhook/no-such-instance"), 404)
    other = add_instance()
    foreign = encode(envelope(change(other.phone_number_id, [media_message()])))
    assert_error(post(foreign, path=f"/webhook/{instance.name}"), 400)
    assert count_rows() == 0
    assert scheduler.jobs == []


def test_body_over_the_limit_is_413(make_settings: Any, database_url: str) -> None:
    small = make_settings(database_url=database_url, webhook_max_bytes=1024)
    services = Services.from_settings(small)
    try:
        client = create_app(services=services, scheduler=_FailingScheduler()).test_client()
        response = client.post(
            "/webhook", data=b"{" + b" " * 2048 + b"}", content_type="application/json"
        )
        assert_error(response, 413)
    finally:
        services.close()


# --- bounds (issue 14: 1d, 2) ---------------------------------------------------------------


@pytest.fixture
def any_statements() -> Iterator[list[str]]:
    """Every SQL statement any engine runs while the test does."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def _many_phone_number_ids(count: int) -> bytes:
    # As small as a change naming an id can be: 70,000 of them fit under the 4 MiB limit.
    one = '{"value":{"metadata":{"phone_number_id":"PID"}}}'
    changes = ",".join(one.replace("PID", str(10**9 + n)) for n in range(count))
    outer = '{"object":"whatsapp_business_account","entry":[{"changes":[CHANGES]}]}'
    return outer.replace("CHANGES", changes).encode()


@pytest.mark.parametrize("count", [1001, 70_000])
def test_a_body_naming_too_many_phone_number_ids_is_413_before_any_database_lookup(
    post: Any, instance: TestInstance, any_statements: list[str], count: int
) -> None:
    # 70,000 distinct ids once hit PostgreSQL's parameter limit (a 503 "database
    # unavailable"), and 30,000 cost 0.7 s of lookups before any signature was checked.
    body = _many_phone_number_ids(count)
    assert len(body) < 4 * 1024 * 1024
    response = post(body)
    assert_error(response, 413)
    assert response.get_json()["error"]["message"] == (
        "Payload names more than 1000 phone number ids"
    )
    assert any_statements == []


@pytest.mark.parametrize("path", ["/webhook", "/webhook/{name}"])
def test_a_body_naming_too_many_media_items_is_413_and_writes_nothing(
    post: Any, instance: TestInstance, count_rows: Any, scheduler: Any, path: str
) -> None:
    messages = [media_message() for _ in range(1001)]
    body = encode(envelope(change(instance.phone_number_id, messages)))
    response = post(body, path=path.format(name=instance.name))
    assert_error(response, 413)
    assert response.get_json()["error"]["message"] == "Payload names more than 1000 media items"
    assert count_rows() == 0 and scheduler.jobs == []
    # At the bound, accepted whole.
    body = encode(envelope(change(instance.phone_number_id, messages[:1000])))
    assert post(body, path=path.format(name=instance.name)).status_code == 200
    assert count_rows() == 1000


LIMIT = 4096


@pytest.fixture
def small_limit(make_settings: Any, database_url: str) -> Iterator[tuple[FlaskClient, Any]]:
    """An app whose bodies may be 4 KiB, and its instance."""
    services = Services.from_settings(
        make_settings(database_url=database_url, webhook_max_bytes=LIMIT)
    )
    try:
        app = create_app(services=services, scheduler=_FailingScheduler())
        with services.sessions.begin() as session:
            from tests.factories import make_instance

            row = make_instance(session, app_secret="app-secret")
            phone_number_id = row.phone_number_id
        yield app.test_client(), phone_number_id
    finally:
        services.close()


def _padded(document: Any, size: int) -> bytes:
    """The body of ``document``, padded with JSON whitespace to exactly ``size`` bytes."""
    body = encode(document)
    assert len(body) <= size
    return body + b" " * (size - len(body))


def _chunked(client: FlaskClient, body: bytes, signature: str) -> Any:
    # As gunicorn (and Werkzeug's server) hand over a chunked body: decoded, no
    # Content-Length, and wsgi.input_terminated set to say the server ends the stream.
    return client.post(
        "/webhook",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked", SIGNATURE_HEADER: signature},
        environ_overrides={"wsgi.input_terminated": True},
    )


def test_a_chunked_body_over_the_limit_is_413_not_cut_and_processed(
    small_limit: tuple[FlaskClient, Any],
) -> None:
    client, phone_number_id = small_limit
    # A signed body of exactly the limit, then unsigned bytes: Werkzeug stopped reading at
    # the limit without a word, and the signature was checked over the cut body (200).
    prefix = _padded(envelope(change(phone_number_id, [media_message()])), LIMIT)
    response = _chunked(client, prefix + b" " * 1024, sign(prefix, "app-secret"))
    assert_error(response, 413)
    whole = prefix + b" " * 1024
    assert_error(_chunked(client, whole * 5, sign(whole * 5, "app-secret")), 413)
    # The same bytes with Content-Length: 413 too, before a byte is read.
    response = client.post(
        "/webhook",
        data=whole,
        content_type="application/json",
        headers={SIGNATURE_HEADER: sign(whole, "app-secret")},
    )
    assert_error(response, 413)


def test_a_chunked_body_up_to_the_limit_is_read_whole_and_signed_whole(
    small_limit: tuple[FlaskClient, Any],
) -> None:
    client, phone_number_id = small_limit
    exact = _padded(envelope(change(phone_number_id, [media_message()])), LIMIT)
    assert _chunked(client, exact, sign(exact, "app-secret")).status_code == 200
    short = encode(envelope(change(phone_number_id, [media_message()])))
    assert _chunked(client, short, sign(short, "app-secret")).status_code == 200
    # A signature over a prefix of what was sent is no signature of it.
    assert_error(_chunked(client, short + b" ", sign(short, "app-secret")), 401)


def test_a_body_the_server_does_not_delimit_is_411_and_a_short_one_400(
    small_limit: tuple[FlaskClient, Any],
) -> None:
    client, phone_number_id = small_limit
    body = encode(envelope(change(phone_number_id, [media_message()])))
    # No Content-Length and a server that does not end the stream: reading could block.
    undelimited = client.post(
        "/webhook",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked", SIGNATURE_HEADER: sign(body, "app-secret")},
    )
    assert_error(undelimited, 411)
    # Content-Length promises more than arrives: the client went away mid-body.
    short = client.post(
        "/webhook",
        input_stream=io.BytesIO(body[:50]),
        content_type="application/json",
        headers={SIGNATURE_HEADER: sign(body, "app-secret")},
        environ_overrides={"CONTENT_LENGTH": str(len(body))},
    )
    assert_error(short, 400)
    assert short.get_json()["error"]["message"] == "Request body incomplete"


@pytest.mark.e2e
def test_gunicorn_answers_413_to_a_chunked_body_over_the_limit(
    embedded_stack: Any, stack_processes: Any
) -> None:
    """The same through a real gunicorn (``ingest web``), which decodes the chunks itself."""
    web = stack_processes.web(env=embedded_stack.env, workers=1)
    assert web.base_url is not None
    limit = 4 * 1024 * 1024  # the default INGEST_WEBHOOK_MAX_BYTES
    # Routes nothing (no phone number id), so it is acknowledged if it is read at all.
    exact = _padded({"object": "whatsapp_business_account", "entry": []}, limit)

    def post_chunked(body: bytes) -> int:
        host, port = web.base_url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
            # The server may answer and close before the rest of an oversized body is sent (a
            # busy machine's timing): its answer is read all the same.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(
                    "POST",
                    "/webhook",
                    body=pieces,
                    headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                    encode_chunked=True,
                )
            return conn.getresponse().status
        finally:
            conn.close()

    assert post_chunked(exact) == 200
    assert post_chunked(exact + b" " * (1024 * 1024)) == 413


@pytest.mark.parametrize("path", ["/webhook", "/webhook/{name}"])
def test_integer_too_long_for_python_is_400(post: Any, instance: TestInstance, path: str) -> None:
    # Past 4,300 digits int() refuses to convert (ValueError, not a JSONDecodeError).
    body = encode(envelope(change(instance.phone_number_id, [media_message()])))
    body = body[:-1] + b',"n":' + b"1" * 5000 + b"}"
    response = post(body, path=path.format(name=instance.name))
    assert_error(response, 400)
    assert response.get_json()["error"]["message"] == "Malformed JSON"


def test_non_ascii_digits_are_read_by_each_fields_rule(
    post: Any, instance: TestInstance, rows: Any
) -> None:
    # "²".isdigit() is true, yet int("²") raises: each field must treat it as not a number.
    timestamp = media_message(message_id="wamid.TS")
    timestamp["timestamp"] = "²"
    fault = media_message(message_id="wamid.FAULT")
    fault["errors"] = [{"code": "²", "title": "Something went wrong"}]
    response = post(encode(envelope(change(instance.phone_number_id, [timestamp, fault]))))
    assert response.status_code == 200
    recorded = {row.message_id: row for row in rows()}
    assert recorded["wamid.TS"].message_timestamp is None  # unreadable timestamp: unknown
    assert recorded["wamid.FAULT"].last_error == "?: Something went wrong"  # code: unknown

    size = media_message(file_size="²")
    response = post(encode(envelope(change(instance.phone_number_id, [size]))))
    assert_error(response, 400)  # a size is required to be a number
    assert "file_size" in response.get_json()["error"]["message"]


@pytest.fixture
def statements(services: Services) -> Iterator[list[str]]:
    """Every SQL statement the app sends from now on."""
    sent: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(services.engine, "before_cursor_execute", note)
    yield sent
    event.remove(services.engine, "before_cursor_execute", note)


@pytest.mark.parametrize("name", ["a%00b", "a%0Ab", "%7F", "a%C2%85b"])
def test_instance_name_with_a_control_character_is_an_unknown_instance(
    client: Any, post: Any, instance: TestInstance, statements: list[str], name: str
) -> None:
    # PostgreSQL refuses a NUL in a text parameter: the name must never reach a query.
    body = encode(envelope(change(instance.phone_number_id, [media_message()])))
    unknown_post = post(body, path="/webhook/no-such-instance")
    unknown_get = handshake(client, "/webhook/no-such-instance", **{"hub.verify_token": "x"})
    statements.clear()

    response = post(body, path=f"/webhook/{name}")
    assert (response.status_code, response.get_json()) == (
        unknown_post.status_code,
        unknown_post.get_json(),
    )
    response = handshake(client, f"/webhook/{name}", **{"hub.verify_token": "x"})
    assert (response.status_code, response.get_json()) == (
        unknown_get.status_code,
        unknown_get.get_json(),
    )
    assert statements == []


def test_instance_name_with_a_newline_cannot_forge_a_log_line(
    post: Any, instance: TestInstance, caplog: pytest.LogCaptureFixture
) -> None:
    body = encode(envelope(change(instance.phone_number_id, [media_message()])))
    with caplog.at_level(logging.INFO, logger="webhook.receiver"):
        post(body, path="/webhook/x%0Awebhook%20status=200")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "webhook.receiver"]
    assert "\n" not in line
    assert "instance=x\\nwebhook status=200 " in line


def test_per_instance_url_accepts_changes_without_metadata(
    post: Any, instance: TestInstance, rows: Any
) -> None:
    body = encode(envelope(change(None, [media_message()])))
    assert post(body, path=f"/webhook/{instance.name}").status_code == 200
    assert [row.instance_id for row in rows()] == [instance.id]
    assert_error(post(body), 404)  # the shared URL cannot route it


# --- durability ----------------------------------------------------------------------------


class _FailingScheduler:
    def __init__(self) -> None:
        self.calls = 0

    def schedule(self, jobs: Any) -> None:
        self.calls += 1
        raise SchedulerUnavailable("ConnectionRefusedError")


def test_the_receiver_never_touches_the_broker(
    services: Services, instance: TestInstance, rows: Any
) -> None:
    failing = _FailingScheduler()
    client = create_app(services=services, scheduler=failing).test_client()
    body = encode(envelope(change(instance.phone_number_id, [media_message()])))
    response = client.post(
        "/webhook",
        data=body,
        headers={SIGNATURE_HEADER: sign(body, "app-secret")},
        content_type="application/json",
    )
    assert response.status_code == 200
    assert response.get_json()["new"] == 1
    assert failing.calls == 0
    (row,) = rows()
    assert row.state == MediaState.PENDING
    assert row.enqueued_at is None  # waiting for the relay


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_real_celery_scheduler_with_broker_down_still_200(
    services: Services, instance: TestInstance, rows: Any
) -> None:
    from tasks.dispatch import CeleryScheduler

    broker = f"redis://127.0.0.1:{_closed_port()}/0"
    scheduler = CeleryScheduler.from_settings(
        services.settings.model_copy(update={"broker_url": broker})
    )
    client = create_app(services=services, scheduler=scheduler).test_client()
    body = encode(envelope(change(instance.phone_number_id, [media_message()])))
    response = client.post(
        "/webhook",
        data=body,
        headers={SIGNATURE_HEADER: sign(body, "app-secret")},
        content_type="application/json",
    )
    assert response.status_code == 200
    assert [row.state for row in rows()] == [MediaState.PENDING]


def test_database_unreachable_gives_503(make_settings: Any) -> None:
    down = make_settings(database_url=f"postgresql+psycopg://nobody@127.0.0.1:{_closed_port()}/x")
    services = Services.from_settings(down)
    try:
        client = create_app(services=services, scheduler=_FailingScheduler()).test_client()
        body = encode(envelope(change("123", [media_message()])))
        response = client.post(
            "/webhook",
            data=body,
            headers={SIGNATURE_HEADER: sign(body, "s")},
            content_type="application/json",
        )
        assert_error(response, 503)
        assert response.headers["Retry-After"]
        for path in ("/webhook/any", "/webhook"):
            query = {"hub.mode": "subscribe", "hub.verify_token": "t", "hub.challenge": "1"}
            assert_error(client.get(path, query_string=query), 503)
    finally:
        services.close()


@pytest.fixture
def database_fails_on_second_insert(services: Services) -> Iterator[None]:
    """The database dies in the middle of the webhook's transaction."""
    inserts = 0

    def fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal inserts
        if statement.lstrip().upper().startswith("INSERT INTO MEDIA_ITEMS"):
            inserts += 1
            if inserts == 2:
                raise services.engine.dialect.loaded_dbapi.OperationalError("connection lost")

    event.listen(services.engine, "before_cursor_execute", fail)
    yield
    event.remove(services.engine, "before_cursor_execute", fail)


@pytest.mark.usefixtures("database_fails_on_second_insert")
def test_database_failure_mid_transaction_gives_503_and_writes_nothing(
    post: Any, instance: TestInstance, count_rows: Any, scheduler: Any
) -> None:
    from ingest.intake import INSERT_CHUNK

    messages = [media_message() for _ in range(INSERT_CHUNK + 5)]
    response = post(encode(envelope(change(instance.phone_number_id, messages))))
    assert_error(response, 503)
    assert count_rows() == 0
    assert scheduler.jobs == []


SIGNED_URL = "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1&hash=SECRETHASH"


@pytest.fixture
def database_refuses_writes(services: Services, instance: TestInstance) -> Iterator[None]:
    """The primary became a read-only node (failover): every write is refused.

    PostgreSQL really refuses (``InternalError: cannot execute INSERT in a read-only
    transaction``, which quotes the failing row's values in other cases); SQLite has no such
    state, so its driver's InternalError is raised where PostgreSQL would raise its own.
    """
    engine = services.engine
    if engine.dialect.name == "postgresql":

        def read_only(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET SESSION default_transaction_read_only = on")
            dbapi_connection.commit()

        event.listen(engine, "connect", read_only)
        engine.dispose()  # connections opened before (the instance's) are still writable
        yield
        event.remove(engine, "connect", read_only)
        return

    def refuse(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            raise engine.dialect.loaded_dbapi.InternalError(
                "cannot execute INSERT in a read-only transaction"
            )

    event.listen(engine, "before_cursor_execute", refuse)
    yield
    event.remove(engine, "before_cursor_execute", refuse)


@pytest.mark.usefixtures("database_refuses_writes")
def test_database_refusing_writes_gives_503_and_logs_no_row_values(
    post: Any, instance: TestInstance, count_rows: Any, caplog: pytest.LogCaptureFixture
) -> None:
    message = media_message(url=SIGNED_URL, caption="private caption")
    with caplog.at_level(logging.DEBUG):
        response = post(encode(envelope(change(instance.phone_number_id, [message]))))
    assert_error(response, 503)
    assert response.headers["Retry-After"]
    assert count_rows() == 0
    assert "database unavailable (InternalError/" in caplog.text
    for secret in ("SECRETHASH", "private caption"):
        assert secret not in caplog.text


def test_same_payload_posted_50_times_concurrently_yields_one_row_per_message(
    app: Any, instance: TestInstance, rows: Any, services: Services
) -> None:
    messages = [media_message(kind) for kind in ("image", "document", "audio")]
    body = encode(envelope(change(instance.phone_number_id, messages)))
    headers = {SIGNATURE_HEADER: sign(body, "app-secret")}
    barrier = threading.Barrier(50)
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def deliver() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post(
            "/webhook", data=body, headers=headers, content_type="application/json"
        )
        with lock:
            results.append((response.status_code, (response.get_json() or {}).get("new", -1)))

    threads = [threading.Thread(target=deliver) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [status for status, _ in results] == [200] * 50
    assert sum(new for _, new in results) == 3
    stored = rows()
    assert sorted(row.message_id for row in stored) == sorted(m["id"] for m in messages)
    # One wake-up per row, from the relay.
    relayed = RecordingScheduler()
    relay_pass(services.sessions, relayed, services.settings)
    assert sorted(job.media_item_id for job in relayed.jobs) == [row.id for row in stored]


# --- logs ----------------------------------------------------------------------------------


def test_one_log_line_per_request_without_url_or_secrets(
    post: Any, instance: TestInstance, caplog: pytest.LogCaptureFixture
) -> None:
    url = "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1&hash=SECRETHASH"
    body = encode(envelope(change(instance.phone_number_id, [media_message(url=url)])))
    with caplog.at_level(logging.DEBUG):
        post(body)
        post(body, signature="sha256=" + "0" * 64)
    lines = [r.getMessage() for r in caplog.records if r.name == "webhook.receiver"]
    assert len(lines) == 2
    assert f"instance={instance.name}" in lines[0]
    assert "status=200" in lines[0] and "media=1" in lines[0] and "new=1" in lines[0]
    assert "latency_ms=" in lines[0]
    assert "status=401" in lines[1]
    everything = caplog.text
    for secret in ("SECRETHASH", "lookaside", "app-secret", sign(body, "app-secret")[7:]):
        assert secret not in everything


def test_a_media_url_of_another_shape_is_dropped_and_logged_without_the_url(
    post: Any, instance: TestInstance, rows: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Under `make run`'s old allowlist, this URL had the worker GET Redis.
    url = "http://127.0.0.1:6379/?token=TOPSECRET"
    message = media_message(url=url)
    body = encode(envelope(change(instance.phone_number_id, [message, media_message()])))
    with caplog.at_level(logging.INFO):
        assert post(body).status_code == 200
    first, second = rows()
    assert first.download_url is None and first.url_deadline is None
    assert first.media_id == message["image"]["id"]  # what the worker resolves instead
    assert second.download_url is None
    assert "ignored 1 media URL(s)" in caplog.text
    assert "6379" not in caplog.text and "TOPSECRET" not in caplog.text


def test_unhandled_database_error_is_logged_without_its_text(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def fails() -> Any:
        raise DataError(
            "INSERT INTO media_items (download_url) VALUES (%(url)s)",
            {"url": SIGNED_URL},
            ValueError(f"Failing row contains ({SIGNED_URL})."),
        )

    app.add_url_rule("/fails", view_func=fails)
    with caplog.at_level(logging.DEBUG):
        response = app.test_client().get("/fails")
    assert_error(response, 500)
    assert "DataError/ValueError" in caplog.text
    assert "in fails" in caplog.text  # where it failed is still there
    assert "SECRETHASH" not in caplog.text


# --- property: no input is a 500 -----------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_no_payload_shape_produces_a_500(
    data: st.DataObject, post: Any, instance: TestInstance
) -> None:
    document = data.draw(webhook_documents(instance.phone_number_id))
    body = json.dumps(document).encode()
    path = data.draw(st.sampled_from(["/webhook", f"/webhook/{instance.name}"]))
    response = post(body, path=path)
    assert response.status_code in (200, 400, 404), response.get_data(as_text=True)
    assert response.is_json


def test_instance_removed_behind_the_cache_gives_503_then_404(
    post: Any, instance: TestInstance, services: Services, count_rows: Any
) -> None:
    from ingest.models import Instance

    body = encode(envelope(change(instance.phone_number_id, [media_message()])))
    assert post(body, secret=None, signature="sha256=" + "0" * 64).status_code == 401  # cached
    with services.sessions.begin() as session:
        session.delete(session.get(Instance, instance.id))
    assert_error(post(body), 503)
    assert_error(post(body), 404)
    assert count_rows() == 0


def test_the_openapi_document_states_the_bounds_and_the_required_fields(client: Any) -> None:
    document = client.get("/openapi.json").get_json()
    for path in ("/webhook", "/webhook/{instance}"):
        post = document["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == ["entry"]
        message = body["properties"]["entry"]["items"]["properties"]["changes"]["items"]
        message = message["properties"]["value"]["properties"]["messages"]["items"]
        assert message["required"] == ["type"]
        assert message["properties"]["image"]["properties"]["id"]["pattern"] == "^[0-9]{1,64}$"
        assert "INGEST_WEBHOOK_MAX_ITEMS" in post["responses"]["413"]["description"]
        assert "INGEST_WEBHOOK_MAX_ITEMS" in post["description"]
        assert "411" in post["responses"]


def test_a_one_message_webhook_on_postgresql_inserts_on_the_driver_connection(
    post: Any, instance: TestInstance, rows: Any, services: Services
) -> None:
    """The receiver's hot path (ingest.media_rows.insert_directly): a single message's insert
    never goes through SQLAlchemy's statement execution, yet lands whole; two messages keep
    the Core path. Fails if the row the receiver builds stops fitting the driver insert."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("the driver insert is PostgreSQL's; SQLite keeps the Core statement")
    through_core: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO MEDIA_ITEMS"):
            through_core.append(statement)

    event.listen(services.engine, "before_cursor_execute", note)
    try:
        one = media_message(url=SIGNED_URL, caption="one")
        assert post(encode(envelope(change(instance.phone_number_id, [one])))).status_code == 200
        assert through_core == []
        two = [media_message(caption="two"), media_message(caption="three")]
        assert post(encode(envelope(change(instance.phone_number_id, two)))).status_code == 200
        assert len(through_core) == 1
    finally:
        event.remove(services.engine, "before_cursor_execute", note)
    stored = rows()
    assert [row.caption for row in stored] == ["one", "two", "three"]
    first = stored[0]
    assert first.state == MediaState.PENDING
    assert first.download_url == SIGNED_URL
    assert first.lease_losses == 0
    assert first.received_at.tzinfo is not None
    assert first.url_deadline is not None and first.url_deadline > first.received_at
