"""Downstream callbacks: the outbox written with each terminal state, and its delivery
(signed, retried with backoff, given up after a day, through the egress guard)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook, WebhookVerificationError

from ingest import accounts, callbacks, metrics, reconciler
from ingest.callback_delivery import CallbackSender, deliver_due
from ingest.callbacks import EventState, configure, new_secret
from ingest.db import session_scope
from ingest.events import MediaEvent, ProviderFault
from ingest.intake import RoutedEvent, is_one_insert, record_events
from ingest.models import CallbackEvent, Instance, MediaItem, MediaState, MediaType, utcnow
from ingest.operations import stats
from ingest.providers import MediaNotFound, ProviderUnavailable
from ingest.settings import Settings
from tests.factories import box_for_session, make_instance, make_media_item
from tests.ingest.test_pipeline import Env, build_env, jpeg
from tests.plugins.wsgi import wsgi_server

# --- a receiver --------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each POST with the next scripted status (then ``default``); records them."""

    statuses: list[int] = field(default_factory=list)
    default: int = 204
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        headers["content-type"] = environ.get("CONTENT_TYPE", "")
        with self.lock:
            self.requests.append(Received(environ["PATH_INFO"], headers, body))
            status = self.statuses.pop(0) if self.statuses else self.default
        extra = [("Location", "/elsewhere")] if 300 <= status < 400 else []
        start_response(f"{status} X", [("Content-Length", "0"), *extra])
        return [b""]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    app = Receiver()
    with wsgi_server(app) as base:
        yield app, base


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


@pytest.fixture
def sender_for(make_settings: Any, database_url: str) -> Iterator[Callable[..., CallbackSender]]:
    built: list[CallbackSender] = []

    def build(private: list[str] | None = None, **settings: Any) -> CallbackSender:
        sender = CallbackSender(
            make_settings(
                database_url=database_url, callback_private_addresses=private or [], **settings
            )
        )
        built.append(sender)
        return sender

    yield build
    for sender in built:
        sender.close()


def _callback_instance(
    sessions: sessionmaker[Session], url: str | None, **overrides: Any
) -> tuple[int, str | None]:
    with session_scope(sessions) as session:
        instance = make_instance(session, **overrides)
        secret = configure(session, instance, url, None, box_for_session(session)) if url else None
        return instance.id, secret


def _item(sessions: sessionmaker[Session], instance_id: int, **values: Any) -> int:
    with session_scope(sessions) as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None
        return make_media_item(session, instance, **values).id


def _stored(sessions: sessionmaker[Session], instance_id: int, **values: Any) -> int:
    body = b"jpeg bytes"
    return _item(
        sessions,
        instance_id,
        state=MediaState.STORED,
        size=len(body),
        actual_sha256=hashlib.sha256(body).hexdigest(),
        actual_mime="image/jpeg",
        stored_at=utcnow(),
        storage_backend="memory",
        storage_key="k",
        caption="a private caption",
        filename="private.jpg",
        sender="15550001234",
        download_url="https://lookaside.fbsbx.com/x?sig=SECRET-signature",
        **values,
    )


def _events(sessions: sessionmaker[Session]) -> list[CallbackEvent]:
    with sessions() as session:
        return list(session.scalars(select(CallbackEvent).order_by(CallbackEvent.id)))


def _announce(sessions: sessionmaker[Session], *item_ids: int) -> int:
    with session_scope(sessions) as session:
        return callbacks.announce(session, item_ids, utcnow())


# --- secrets and configuration -----------------------------------------------------------


def test_a_new_secret_is_standard_webhooks_shaped_and_signs() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and secret != new_secret()
    assert callbacks.check_secret(secret) == secret
    headers = callbacks.signature_headers(secret, "evt_1", '{"a":1}', utcnow())
    assert Webhook(secret).verify('{"a":1}', headers) == {"a": 1}


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "https:///no-host",
        "https://user:pass@example.com/hook",
        "https://token@example.com/hook",
        "not a url",
        "https://example.com:99999/hook",
    ],
)
def test_configure_refuses_unusable_urls(sessions: sessionmaker[Session], url: str) -> None:
    with session_scope(sessions) as session:
        instance = make_instance(session)
        with pytest.raises(accounts.RegistryError):
            configure(session, instance, url, None, box_for_session(session))


def test_configure_refuses_a_weak_secret(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        instance = make_instance(session)
        for secret in ("whsec_c2hvcnQ=", "whsec_not base64!"):
            with pytest.raises(accounts.RegistryError):
                configure(
                    session, instance, "https://example.com/h", secret, box_for_session(session)
                )


def test_configure_stores_the_secret_encrypted_and_removal_clears_both(
    sessions: sessionmaker[Session],
) -> None:
    given = new_secret()
    with session_scope(sessions) as session:
        instance = make_instance(session)
        box = box_for_session(session)
        generated = configure(session, instance.name, "https://example.com/h?t=1", None, box)
        assert generated is not None and generated.startswith("whsec_")
        assert configure(session, instance, "https://example.com/h", given, box) == given
        assert instance.callback_secret_encrypted is not None
        assert given not in instance.callback_secret_encrypted
        assert box.decrypt(instance.callback_secret_encrypted) == given
        instance_id = instance.id
    item_id = _stored(sessions, instance_id)
    assert _announce(sessions, item_id) == 1

    with session_scope(sessions) as session:
        again = session.get(Instance, instance_id)
        assert again is not None
        assert configure(session, again, None, None, box_for_session(session)) is None
        assert (again.callback_url, again.callback_secret_encrypted) == (None, None)
    # A pending event has nowhere to go any more.
    (event_row,) = _events(sessions)
    assert event_row.state == EventState.FAILED


def test_private_addresses_setting_takes_literal_addresses_only(make_settings: Any) -> None:
    settings = make_settings(callback_private_addresses="127.0.0.1:8080, [::1]:9000,10.0.0.7")
    assert settings.callback_private_addresses == ["127.0.0.1:8080", "[::1]:9000", "10.0.0.7"]
    with pytest.raises(ValidationError):
        make_settings(callback_private_addresses="localhost:8080")


# --- the outbox ----------------------------------------------------------------------------


def test_announce_writes_one_event_per_terminal_row_of_an_instance_with_a_callback(
    sessions: sessionmaker[Session],
) -> None:
    with_callback, secret = _callback_instance(sessions, "https://example.com/hook")
    without, _ = _callback_instance(sessions, None)
    stored = _stored(sessions, with_callback)
    failed = _item(
        sessions, with_callback, state=MediaState.FAILED, failure_reason="media_not_found"
    )
    expired = _item(sessions, with_callback, state=MediaState.EXPIRED)
    pending = _item(sessions, with_callback)
    elsewhere = _stored(sessions, without)

    assert _announce(sessions, stored, failed, expired, pending, elsewhere) == 3

    events = {e.media_item_id: e for e in _events(sessions)}
    assert set(events) == {stored, failed, expired}
    assert {e.event_type for e in events.values()} == {
        "media.stored",
        "media.failed",
        "media.expired",
    }
    assert len({e.event_id for e in events.values()}) == 3
    assert all(e.event_id.startswith("evt_") for e in events.values())
    assert all((e.state, e.attempts) == ("pending", 0) for e in events.values())
    failed_body = json.loads(events[failed].body)
    assert failed_body["data"]["reason"] == "media_not_found"
    assert failed_body["data"]["sha256"] is None
    assert set(failed_body["data"]["paths"]) == {"metadata"}  # no bytes to fetch
    assert secret is not None


def test_a_stored_event_names_the_item_and_its_paths_never_its_bytes_or_secrets(
    sessions: sessionmaker[Session],
) -> None:
    instance_id, secret = _callback_instance(
        sessions, "https://example.com/hook?token=URL-TOKEN", name="shop-1"
    )
    item_id = _stored(sessions, instance_id, message_id="wamid.A+B/C=")
    _announce(sessions, item_id)

    (event_row,) = _events(sessions)
    body = json.loads(event_row.body)
    assert body["type"] == "media.stored"
    assert body["timestamp"].endswith("Z")
    data = body["data"]
    assert data["instance"] == "shop-1"
    assert data["messageId"] == "wamid.A+B/C="
    assert (data["mediaType"], data["state"], data["reason"]) == ("image", "stored", None)
    assert data["size"] == len(b"jpeg bytes")
    assert data["sha256"] == hashlib.sha256(b"jpeg bytes").hexdigest()
    assert data["mimeType"] == "image/jpeg"
    assert data["receivedAt"].endswith("Z") and data["storedAt"].endswith("Z")
    query = "?messageId=wamid.A%2BB%2FC%3D"
    assert data["paths"] == {
        "base64": f"/api/chat/base64/shop-1{query}",
        "media": f"/api/chat/media/shop-1{query}",
        "metadata": f"/api/chat/find-message/shop-1{query}",
    }
    assert secret is not None
    for private in (
        "private caption",
        "private.jpg",
        "15550001234",
        "SECRET-signature",
        "URL-TOKEN",
        "api-key",
        secret,
        "jpeg bytes",
    ):
        assert private not in event_row.body


# --- delivery ------------------------------------------------------------------------------


def test_a_delivered_event_is_correctly_signed_and_recorded(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    app, base = receiver
    instance_id, secret = _callback_instance(sessions, f"{base}/hook?token=t")
    _announce(sessions, _stored(sessions, instance_id))
    sender = sender_for([f"127.0.0.1:{_port(base)}"])
    before = _deliveries("delivered")

    report = deliver_due(sessions, sender, utcnow())

    assert (report.delivered, report.retried, report.failed) == (1, 0, 0)
    (request,) = app.requests
    assert request.path == "/hook"
    (event_row,) = _events(sessions)
    assert request.body == event_row.body.encode()
    assert request.headers["webhook-id"] == event_row.event_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("ingest-media")
    assert secret is not None
    assert Webhook(secret).verify(request.body, request.headers)["type"] == "media.stored"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(request.body, request.headers)
    assert (event_row.state, event_row.attempts, event_row.last_status) == ("delivered", 1, 204)
    assert event_row.delivered_at is not None and event_row.lease_until is None
    assert _deliveries("delivered") == before + 1
    # Delivered is final: nothing is sent again.
    assert deliver_due(sessions, sender, utcnow() + timedelta(hours=2)).attempted == 0
    assert len(app.requests) == 1


def _deliveries(outcome: str) -> float:
    value = metrics.CALLBACK_DELIVERIES.labels(outcome)._value.get()
    return float(value)


def test_a_500_is_retried_later_with_the_same_id_and_a_fresh_signature(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    app, base = receiver
    app.statuses = [500]
    instance_id, secret = _callback_instance(sessions, f"{base}/hook")
    _announce(sessions, _stored(sessions, instance_id))
    sender = sender_for([f"127.0.0.1:{_port(base)}"])
    now = utcnow()

    assert deliver_due(sessions, sender, now).retried == 1
    (event_row,) = _events(sessions)
    assert (event_row.state, event_row.last_status) == ("pending", 500)
    assert event_row.last_error == "127.0.0.1 answered HTTP 500"
    # First delay: 2.5 to 5 s.
    assert now + timedelta(seconds=2.5) <= event_row.next_attempt_at <= now + timedelta(seconds=5)
    assert deliver_due(sessions, sender, now + timedelta(seconds=1)).attempted == 0

    later = now + timedelta(seconds=6)
    assert deliver_due(sessions, sender, later).delivered == 1
    first, second = app.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert int(second.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"]) + 5
    assert secret is not None
    for request in (first, second):
        Webhook(secret).verify(request.body, request.headers)
    (event_row,) = _events(sessions)
    assert (event_row.state, event_row.attempts) == ("delivered", 2)


def test_backoff_doubles_to_an_hour_and_gives_up_after_a_day(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    app, base = receiver
    app.default = 503
    instance_id, _ = _callback_instance(sessions, f"{base}/hook")
    _announce(sessions, _stored(sessions, instance_id))
    sender = sender_for([f"127.0.0.1:{_port(base)}"])
    (event_row,) = _events(sessions)
    deadline = event_row.created_at + timedelta(hours=24)
    now = event_row.created_at
    delays = []
    for _ in range(100):
        report = deliver_due(sessions, sender, now)
        assert report.attempted == 1
        (event_row,) = _events(sessions)
        if event_row.state == EventState.FAILED:
            break
        assert event_row.next_attempt_at <= deadline
        delays.append((event_row.next_attempt_at - now).total_seconds())
        now = event_row.next_attempt_at
    assert event_row.state == EventState.FAILED
    assert now >= deadline  # the last try came at the deadline, not before
    assert event_row.attempts == len(app.requests) == len(delays) + 1
    # Delays double from 5 s to the hour cap, each between half and all of its value (equal
    # jitter): a day holds at least 24 hour-long waits and at most about 10 + 48 shorter ones.
    assert 24 <= event_row.attempts <= 60
    assert 2.5 <= delays[0] <= 5 and 5 <= delays[1] <= 10 and 10 <= delays[2] <= 20
    assert max(delays) <= 3600 and max(delays) >= 1800
    assert deliver_due(sessions, sender, now + timedelta(days=1)).attempted == 0


def test_a_private_address_is_refused_unless_listed_with_its_port(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    app, base = receiver
    port = _port(base)
    instance_id, _ = _callback_instance(sessions, f"http://localhost:{port}/hook")
    _announce(sessions, _stored(sessions, instance_id))
    now = utcnow()

    for private in ([], ["127.0.0.1"], [f"127.0.0.1:{port + 1}"]):
        assert deliver_due(sessions, sender_for(private), now).retried == 1
        (event_row,) = _events(sessions)
        assert event_row.last_error == "localhost resolves to an address that is not allowed"
        assert event_row.last_status is None
        now = event_row.next_attempt_at
    assert app.requests == []

    assert deliver_due(sessions, sender_for([f"127.0.0.1:{port}"]), now).delivered == 1
    assert len(app.requests) == 1


def test_a_redirect_is_a_failure_and_is_not_followed(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    app, base = receiver
    app.statuses = [307]
    instance_id, _ = _callback_instance(sessions, f"{base}/hook")
    _announce(sessions, _stored(sessions, instance_id))

    assert deliver_due(sessions, sender_for([f"127.0.0.1:{_port(base)}"]), utcnow()).retried == 1

    assert [r.path for r in app.requests] == ["/hook"]
    (event_row,) = _events(sessions)
    assert event_row.last_status == 307
    assert event_row.last_error is not None and "redirect" in event_row.last_error


def test_a_failing_receiver_is_tried_once_per_pass(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    app, base = receiver
    app.default = 500
    instance_id, _ = _callback_instance(sessions, f"{base}/hook")
    for _ in range(3):
        _announce(sessions, _stored(sessions, instance_id))

    report = deliver_due(sessions, sender_for([f"127.0.0.1:{_port(base)}"]), utcnow())

    assert (report.attempted, len(app.requests)) == (1, 1)


def test_concurrent_senders_deliver_each_event_exactly_once(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    app, base = receiver
    instance_id, _ = _callback_instance(sessions, f"{base}/hook")
    items = [_stored(sessions, instance_id) for _ in range(24)]
    _announce(sessions, *items)
    sender = sender_for([f"127.0.0.1:{_port(base)}"])
    now = utcnow()
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait()
            deliver_due(sessions, sender, now)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []
    ids = [r.headers["webhook-id"] for r in app.requests]
    assert len(ids) == len(set(ids)) == 24
    assert {e.state for e in _events(sessions)} == {"delivered"}
    assert {e.attempts for e in _events(sessions)} == {1}


def test_an_expired_lease_lets_another_sender_take_the_event(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    sender_for: Callable[..., CallbackSender],
) -> None:
    _app, base = receiver
    instance_id, _ = _callback_instance(sessions, f"{base}/hook")
    _announce(sessions, _stored(sessions, instance_id))
    now = utcnow()
    # A sender claimed it and died: the lease holds it, then lets it go.
    with session_scope(sessions) as session:
        session.execute(
            update(CallbackEvent).values(lease_until=now + timedelta(seconds=60), attempts=1)
        )
    sender = sender_for([f"127.0.0.1:{_port(base)}"])
    assert deliver_due(sessions, sender, now).attempted == 0
    assert deliver_due(sessions, sender, now + timedelta(seconds=61)).delivered == 1
    (event_row,) = _events(sessions)
    assert event_row.attempts == 2


# --- the hooks: each terminal state change writes its event in its own transaction ---------


@pytest.fixture
def pipeline_env(settings: Settings, sessions: sessionmaker[Session]) -> Env:
    env = build_env(settings, sessions)
    with session_scope(sessions) as session:
        instance = session.get(Instance, env.instance_id)
        assert instance is not None
        configure(session, instance, "https://example.com/hook", None, box_for_session(session))
    return env


def test_the_pipeline_announces_a_stored_item(pipeline_env: Env) -> None:
    env = pipeline_env
    body = jpeg()
    env.provider.add("m1", body)
    item_id = env.item("m1", declared_sha256=hashlib.sha256(body).hexdigest())

    assert env.pipeline.run(item_id).state == MediaState.STORED

    (event_row,) = _events(env.sessions)
    assert (event_row.media_item_id, event_row.event_type) == (item_id, "media.stored")
    assert json.loads(event_row.body)["data"]["sha256"] == hashlib.sha256(body).hexdigest()


def test_the_pipeline_announces_a_failed_item(pipeline_env: Env) -> None:
    env = pipeline_env
    env.provider.add("gone", jpeg())
    env.provider.lookup_errors.append(MediaNotFound("no such media", endpoint="lookup", status=404))
    item_id = env.item("gone", fresh=False)

    result = env.pipeline.run(item_id)

    assert (result.state, result.reason) == (MediaState.FAILED, "media_not_found")
    (event_row,) = _events(env.sessions)
    assert (event_row.media_item_id, event_row.event_type) == (item_id, "media.failed")
    assert json.loads(event_row.body)["data"]["reason"] == "media_not_found"


def test_a_retry_is_not_announced(pipeline_env: Env) -> None:
    env = pipeline_env
    env.provider.add("later", jpeg())
    env.provider.lookup_errors.append(ProviderUnavailable("down", endpoint="lookup", status=503))
    item_id = env.item("later", fresh=False)

    assert env.pipeline.run(item_id).state == MediaState.PENDING

    assert _events(env.sessions) == []


def test_the_stored_record_and_its_event_share_one_transaction(
    pipeline_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = pipeline_env
    env.provider.add("m1", jpeg())
    item_id = env.item("m1")

    def broken(*_: Any, **__: Any) -> int:
        raise RuntimeError("the outbox insert failed")

    monkeypatch.setattr(callbacks, "announce", broken)
    with pytest.raises(RuntimeError):
        env.pipeline.run(item_id)

    assert env.row(item_id).state == MediaState.DOWNLOADING  # the record was rolled back


def test_an_instance_without_a_callback_costs_the_pipeline_no_statement(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    env = build_env(settings, sessions)
    env.provider.add("m1", jpeg())
    env.provider.lookup_errors.append(MediaNotFound("x", endpoint="lookup", status=404))
    stored_id = env.item("m1")
    env.provider.add("m2", jpeg())
    failed_id = env.item("m2", fresh=False)
    engine = sessions.kw["bind"]
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert env.pipeline.run(stored_id).state == MediaState.STORED
        assert env.pipeline.run(failed_id).state == MediaState.FAILED
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert not [s for s in seen if "callback_events" in s]
    assert _events(sessions) == []


def test_the_reconciler_announces_expired_and_worker_lost_items(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    instance_id, _ = _callback_instance(sessions, "https://example.com/hook")
    quiet_id, _ = _callback_instance(sessions, None)
    now = utcnow()
    overdue = _item(sessions, instance_id, expires_at=now - timedelta(minutes=1))
    quiet_overdue = _item(sessions, quiet_id, expires_at=now - timedelta(minutes=1))
    lost = _item(
        sessions,
        instance_id,
        state=MediaState.DOWNLOADING,
        lease_until=now - timedelta(seconds=1),
        lease_owner="dead",
        lease_losses=settings.max_lease_losses - 1,
    )
    released = _item(
        sessions,
        instance_id,
        state=MediaState.DOWNLOADING,
        lease_until=now - timedelta(seconds=1),
        lease_owner="dead",
    )

    assert reconciler.expire_overdue(sessions, now) == 2
    assert reconciler.recover_lapsed_leases(sessions, settings, now) == (1, 1)

    events = {e.media_item_id: e.event_type for e in _events(sessions)}
    assert events == {overdue: "media.expired", lost: "media.failed"}
    assert quiet_overdue not in events and released not in events


def test_an_expiry_and_its_events_share_one_transaction(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id, _ = _callback_instance(sessions, "https://example.com/hook")
    now = utcnow()
    overdue = _item(sessions, instance_id, expires_at=now - timedelta(minutes=1))

    def broken(*_: Any, **__: Any) -> int:
        raise RuntimeError("the outbox insert failed")

    monkeypatch.setattr(callbacks, "announce", broken)
    with pytest.raises(RuntimeError):
        reconciler.expire_overdue(sessions, now)

    with sessions() as session:
        assert session.get(MediaItem, overdue).state == MediaState.PENDING  # type: ignore[union-attr]


def _fault_event(message_id: str) -> MediaEvent:
    return MediaEvent(
        phone_number_id=None,
        message_id=message_id,
        media_type=MediaType.DOCUMENT,
        media_id=None,
        mime_type="application/pdf",
        sha256=None,
        url=None,
        fault=ProviderFault(code=131052, title="Media file too large"),
    )


def test_intake_announces_rows_failed_on_arrival_in_its_transaction(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    instance_id, _ = _callback_instance(sessions, "https://example.com/hook")
    routed = [RoutedEvent(instance_id, _fault_event("wamid.F1"))]
    # A second statement follows the insert: the receiver must not run it in autocommit.
    assert not is_one_insert(routed)

    with session_scope(sessions) as session:
        recorded = record_events(session, routed, settings=settings, received_at=utcnow())
    assert recorded.failed == 1

    (event_row,) = _events(sessions)
    data = json.loads(event_row.body)["data"]
    assert (event_row.event_type, data["messageId"], data["reason"]) == (
        "media.failed",
        "wamid.F1",
        "too_large",
    )

    # Repeated: no new row, no second event.
    with session_scope(sessions) as session:
        record_events(session, routed, settings=settings, received_at=utcnow())
    assert len(_events(sessions)) == 1


def test_an_arrival_and_its_event_share_one_transaction(
    settings: Settings, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id, _ = _callback_instance(sessions, "https://example.com/hook")

    def broken(*_: Any, **__: Any) -> int:
        raise RuntimeError("the outbox insert failed")

    monkeypatch.setattr(callbacks, "announce", broken)
    with pytest.raises(RuntimeError), session_scope(sessions) as session:
        record_events(
            session,
            [RoutedEvent(instance_id, _fault_event("wamid.F2"))],
            settings=settings,
            received_at=utcnow(),
        )
    with sessions() as session:
        assert session.scalars(select(MediaItem)).all() == []


# --- visible in stats ----------------------------------------------------------------------


def test_stats_count_events_per_instance_and_state(
    sessions: sessionmaker[Session],
) -> None:
    instance_id, _ = _callback_instance(sessions, "https://example.com/hook", name="shop")
    items = [_stored(sessions, instance_id) for _ in range(3)]
    _announce(sessions, *items)
    with session_scope(sessions) as session:
        first, second = session.scalars(
            select(CallbackEvent.id).order_by(CallbackEvent.id).limit(2)
        ).all()
        session.execute(
            update(CallbackEvent).where(CallbackEvent.id == first).values(state="delivered")
        )
        session.execute(
            update(CallbackEvent).where(CallbackEvent.id == second).values(state="failed")
        )
        session.execute(
            update(CallbackEvent)
            .where(CallbackEvent.state == "pending")
            .values(created_at=utcnow() - timedelta(minutes=10))
        )

    with sessions() as session:
        result = stats(session, utcnow())

    (shop,) = result.callbacks
    assert (shop.instance, shop.pending, shop.delivered, shop.failed) == ("shop", 1, 1, 1)
    assert shop.oldest_pending_seconds is not None and 590 < shop.oldest_pending_seconds < 700


def test_ingest_stats_shows_deliveries(runner: CliRunner, database_url: str) -> None:
    from cli.main import cli
    from ingest.db import make_engine, make_session_factory

    engine = make_engine(database_url)
    try:
        sessions = make_session_factory(engine)
        instance_id, _ = _callback_instance(sessions, "https://example.com/hook", name="shop")
        _announce(sessions, _stored(sessions, instance_id))
    finally:
        engine.dispose()

    table = runner.invoke(cli, ["stats"])
    assert table.exit_code == 0, table.output
    header = next(line for line in table.output.splitlines() if line.startswith("callbacks"))
    assert header.split() == ["callbacks", "pending", "delivered", "failed", "oldest", "pending"]
    assert any(line.split()[:4] == ["shop", "1", "0", "0"] for line in table.output.splitlines())

    document = json.loads(runner.invoke(cli, ["stats", "--json"]).output)
    (shop,) = document["callbacks"]
    assert (shop["instance"], shop["pending"], shop["delivered"], shop["failed"]) == (
        "shop",
        1,
        0,
        0,
    )
