"""Signature checks and recording rows, against the parametrised databases."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ingest import accounts, media_rows
from ingest.events import MediaEvent, ProviderFault
from ingest.intake import (
    INSERT_CHUNK,
    SIGNATURE_HEADER,
    InstanceRoute,
    RoutedEvent,
    authenticate,
    record_events,
    sign,
    signature_valid,
    verify_token_matches,
)
from ingest.models import Instance, MediaItem, MediaState, MediaType
from ingest.settings import Settings
from tests.factories import TEST_SECRET_KEY, box_for_session, make_instance

BODY = b'{"entry":[{"caption":"caf\\u00e9"}]}'
NOW = datetime(2024, 6, 10, 12, 0, tzinfo=UTC)


# --- signatures ------------------------------------------------------------------------


def test_signature_valid_for_the_exact_bytes_only() -> None:
    header = sign(BODY, "s3cret")
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert signature_valid(BODY, header, "s3cret")
    assert signature_valid(BODY, header.upper().replace("SHA256=", "sha256="), "s3cret")
    assert not signature_valid(BODY + b" ", header, "s3cret")
    assert not signature_valid('{"entry":[{"caption":"café"}]}'.encode(), header, "s3cret")
    assert not signature_valid(BODY, header, "other")


@pytest.mark.parametrize(
    "header",
    [None, "", "sha256=", "sha1=" + "0" * 40, "0" * 64, "sha256=zz", "sha256=é" + "0" * 63],
)
def test_malformed_signature_headers_are_invalid_not_errors(header: str | None) -> None:
    assert not signature_valid(BODY, header, "s3cret")


class Headers(dict[str, str]):
    """Case-insensitive enough for these tests, like werkzeug's Headers."""

    def get(self, key: str, default: Any = None) -> Any:
        for name, value in self.items():
            if name.lower() == key.lower():
                return value
        return default


def test_authenticate_requires_every_configured_check(session: Session) -> None:
    both = make_instance(
        session,
        app_secret="app",
        webhook_secret_header="X-Secret",
        webhook_secret="shared",
    )
    route = InstanceRoute.of(both, box_for_session(session))
    signed = {SIGNATURE_HEADER: sign(BODY, "app")}
    assert authenticate(route, BODY, Headers({**signed, "x-secret": "shared"}))
    assert not authenticate(route, BODY, Headers(signed))
    assert not authenticate(route, BODY, Headers({"X-Secret": "shared"}))
    assert not authenticate(route, BODY, Headers({**signed, "X-Secret": "wrong"}))


def test_an_instance_without_checks_takes_posts_only_if_unsigned_ones_were_allowed(
    session: Session,
) -> None:
    # A row from before webhooks had to be authenticated: no check, and no consent either.
    legacy = InstanceRoute(
        id=1,
        name="legacy",
        phone_number_id="1",
        app_secret=None,
        webhook_secret_header=None,
        webhook_secret_hash=None,
    )
    assert not authenticate(legacy, BODY, Headers())
    assert not authenticate(legacy, BODY, Headers({SIGNATURE_HEADER: sign(BODY, "x")}))

    allowed = InstanceRoute.of(make_instance(session, app_secret=None, allow_unsigned=True), None)
    assert authenticate(allowed, BODY, Headers())


def test_the_route_carries_the_app_secret_decrypted_and_never_shows_it(session: Session) -> None:
    row = make_instance(session, app_secret="meta-app-secret")
    assert row.app_secret_encrypted is not None and "meta" not in row.app_secret_encrypted
    route = InstanceRoute.of(row, box_for_session(session))
    assert route.app_secret == "meta-app-secret"
    assert "meta-app-secret" not in repr(route)
    assert authenticate(route, BODY, Headers({SIGNATURE_HEADER: sign(BODY, "meta-app-secret")}))


def test_verify_token_matches_any_instance_in_constant_time(session: Session) -> None:
    instances = [
        make_instance(session, verify_token="alpha"),
        make_instance(session, verify_token=None),
        make_instance(session, verify_token="beta"),
    ]
    assert verify_token_matches("beta", instances)
    assert not verify_token_matches("gamma", instances)
    assert not verify_token_matches("", instances)
    assert not verify_token_matches("alpha", [])
    # Only the hash is stored, and the hash itself is no token.
    assert instances[2].verify_token_hash == hashlib.sha256(b"beta").hexdigest()
    assert not verify_token_matches(hashlib.sha256(b"beta").hexdigest(), instances)


# --- recording -------------------------------------------------------------------------


def image(message_id: str, **overrides: Any) -> MediaEvent:
    values: dict[str, Any] = {
        "phone_number_id": None,
        "message_id": message_id,
        "media_type": MediaType.IMAGE,
        "media_id": "m-" + message_id,
        "mime_type": "image/jpeg",
        "sha256": "b" * 64,
        "url": "https://lookaside.fbsbx.com/x",
    }
    values.update(overrides)
    return MediaEvent(**values)


@pytest.fixture
def instance(session: Session) -> Instance:
    row = make_instance(session)
    session.commit()
    return row


def stored(session: Session) -> list[MediaItem]:
    session.expire_all()
    return list(session.scalars(select(MediaItem).order_by(MediaItem.id)))


def test_record_inserts_pending_rows_that_wait_for_the_relay(
    session: Session, settings: Settings, instance: Instance
) -> None:
    events = [
        RoutedEvent(instance.id, image("w1")),
        RoutedEvent(instance.id, image("w2", media_type=MediaType.VIDEO, url=None)),
    ]
    recorded = record_events(session, events, settings=settings, received_at=NOW)
    session.commit()
    rows = stored(session)
    assert (recorded.media, recorded.new, recorded.failed) == (2, 2, 0)
    first, second = rows
    assert first.state == MediaState.PENDING
    assert first.received_at == NOW
    assert first.next_attempt_at == NOW
    assert first.enqueued_at is None  # no wake-up yet: the relay publishes it
    assert first.url_deadline == NOW + timedelta(minutes=5)
    assert first.expires_at == NOW + timedelta(seconds=settings.media_retention_seconds)
    assert first.download_url == "https://lookaside.fbsbx.com/x"
    assert first.declared_sha256 == "b" * 64
    assert first.attempts == 0
    assert second.url_deadline is None
    assert second.download_url is None


def test_record_on_a_core_connection_commits_with_it(
    session: Session, settings: Settings, instance: Instance
) -> None:
    # The receiver records on a bare Core connection, not an ORM session.
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    with engine.begin() as connection:
        recorded = record_events(
            connection,
            [RoutedEvent(instance.id, image("c1")), RoutedEvent(instance.id, image("c1"))],
            settings=settings,
            received_at=NOW,
        )
    with engine.begin() as connection:
        again = record_events(
            connection, [RoutedEvent(instance.id, image("c1"))], settings=settings, received_at=NOW
        )
    rows = stored(session)
    assert (recorded.media, recorded.new) == (2, 1)
    assert (again.new, again.rewoken) == (0, 0)
    assert [(row.message_id, row.state) for row in rows] == [("c1", MediaState.PENDING)]


def test_repeats_insert_nothing(session: Session, settings: Settings, instance: Instance) -> None:
    other = make_instance(session)
    session.commit()
    record_events(
        session, [RoutedEvent(instance.id, image("w1"))], settings=settings, received_at=NOW
    )
    session.commit()
    again = record_events(
        session,
        [
            RoutedEvent(instance.id, image("w1")),
            RoutedEvent(instance.id, image("w2")),
            RoutedEvent(instance.id, image("w2")),  # twice in one body
            RoutedEvent(other.id, image("w1")),  # same wamid, other instance: a new row
        ],
        settings=settings,
        received_at=NOW,
    )
    session.commit()
    assert (again.media, again.new, again.rewoken) == (4, 2, 0)
    assert sorted((row.instance_id, row.message_id) for row in stored(session)) == sorted(
        [(instance.id, "w1"), (instance.id, "w2"), (other.id, "w1")]
    )


def test_a_redelivery_wakes_a_pending_row_whose_wake_up_is_old(
    session: Session, settings: Settings, instance: Instance
) -> None:
    """The wake-up may have been lost (a relay died between stamp and publish): the
    provider's redelivery clears it for the relay again, once it is older than the wake
    timeout."""
    record_events(
        session, [RoutedEvent(instance.id, image("r1"))], settings=settings, received_at=NOW
    )
    session.commit()
    assert len(media_rows.take_unwoken(session, NOW, 10)) == 1  # the relay's stamp
    session.commit()
    soon = NOW + timedelta(seconds=settings.reconcile_interval_seconds / 2)
    early = record_events(
        session, [RoutedEvent(instance.id, image("r1"))], settings=settings, received_at=soon
    )
    session.commit()
    late_at = NOW + timedelta(seconds=settings.reconcile_interval_seconds + 1)
    late = record_events(
        session, [RoutedEvent(instance.id, image("r1"))], settings=settings, received_at=late_at
    )
    session.commit()
    again = record_events(
        session, [RoutedEvent(instance.id, image("r1"))], settings=settings, received_at=late_at
    )
    session.commit()

    (row,) = stored(session)
    assert early.rewoken == 0  # its wake-up is recent: nothing to do
    assert (late.new, late.rewoken) == (0, 1)
    assert again.rewoken == 0  # already waiting for the relay
    assert row.enqueued_at is None


def test_a_redelivery_leaves_rows_that_are_not_pending_and_due_alone(
    session: Session, settings: Settings, instance: Instance
) -> None:
    record_events(
        session,
        [RoutedEvent(instance.id, image(name)) for name in ("done", "later")],
        settings=settings,
        received_at=NOW,
    )
    session.commit()
    media_rows.take_unwoken(session, NOW, 10)
    done, later = stored(session)
    done.state = MediaState.STORED
    later.next_attempt_at = NOW + timedelta(hours=1)
    session.commit()
    late_at = NOW + timedelta(minutes=10)
    again = record_events(
        session,
        [RoutedEvent(instance.id, image(name)) for name in ("done", "later")],
        settings=settings,
        received_at=late_at,
    )
    assert again.rewoken == 0


@pytest.mark.parametrize(
    ("sent", "issued"),
    [
        (None, NOW),  # no timestamp: receipt is all we know
        (NOW - timedelta(seconds=2), NOW - timedelta(seconds=2)),  # the usual delivery
        (NOW - timedelta(minutes=40), NOW - timedelta(minutes=40)),  # redelivered late
        (NOW + timedelta(minutes=3), NOW),  # the sender's clock is ahead of ours
    ],
)
def test_url_and_media_id_windows_start_when_the_message_was_sent(
    session: Session,
    settings: Settings,
    instance: Instance,
    sent: datetime | None,
    issued: datetime,
) -> None:
    record_events(
        session,
        [RoutedEvent(instance.id, image("w1", timestamp=sent))],
        settings=settings,
        received_at=NOW,
    )
    session.commit()
    (row,) = stored(session)
    assert row.received_at == NOW
    assert row.url_deadline == issued + timedelta(minutes=5)
    assert row.expires_at == issued + timedelta(seconds=settings.media_retention_seconds)


def test_provider_faults_become_failed_rows(
    session: Session, settings: Settings, instance: Instance
) -> None:
    fault = ProviderFault(code=131052, title="Media file too large")
    recorded = record_events(
        session,
        [RoutedEvent(instance.id, image("w1", fault=fault, media_id=None))],
        settings=settings,
        received_at=NOW,
    )
    session.commit()
    (row,) = stored(session)
    assert (recorded.new, recorded.failed) == (1, 1)
    assert row.state == MediaState.FAILED
    assert row.failure_reason == "too_large"
    assert row.last_error == "131052: Media file too large"
    assert row.download_url is None
    assert row.enqueued_at is None


def test_stated_size_sets_the_send_limit_flag(
    session: Session, settings: Settings, instance: Instance
) -> None:
    big = settings.large_media_bytes
    recorded = record_events(
        session,
        [
            RoutedEvent(instance.id, image("small", file_size=1000)),
            RoutedEvent(instance.id, image("big", file_size=big + 1)),
            RoutedEvent(
                instance.id,
                image("doc", media_type=MediaType.DOCUMENT, file_size=10),
            ),
        ],
        settings=settings,
        received_at=NOW,
    )
    session.commit()
    assert recorded.new == 3
    rows = {row.message_id: row for row in stored(session)}
    assert rows["big"].over_send_limit is True  # over the 5 MB image sending limit
    assert rows["small"].over_send_limit is False
    assert rows["big"].declared_size == big + 1


def test_large_batches_are_chunked_and_all_recorded(
    session: Session, settings: Settings, instance: Instance
) -> None:
    count = INSERT_CHUNK * 2 + 3
    events = [RoutedEvent(instance.id, image(f"w{i}")) for i in range(count)]
    recorded = record_events(session, events, settings=settings, received_at=NOW)
    session.commit()
    assert recorded.new == count
    assert len(stored(session)) == count


# --- instance directory ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_directory_caches_hits_for_its_ttl_and_never_caches_misses(
    sessions: Any, session: Session
) -> None:
    from ingest.intake import InstanceDirectory

    box = box_for_session(session)
    row = make_instance(session, app_secret="old")
    session.commit()
    clock = Clock()
    directory = InstanceDirectory(sessions, ttl_seconds=5.0, clock=clock, box=box)
    assert directory.by_name("nobody") is None
    route = directory.by_phone_number_ids([row.phone_number_id, "unknown"])
    assert list(route) == [row.phone_number_id]
    assert route[row.phone_number_id].app_secret == "old"
    assert "old" not in repr(route[row.phone_number_id])

    accounts.update_instance(session, row.name, accounts.InstanceUpdate(app_secret="new"), box)
    late = make_instance(session)
    session.commit()
    assert directory.by_name(row.name).app_secret == "old"  # type: ignore[union-attr]
    assert directory.by_name(late.name) is not None  # a miss goes to the database
    clock.now = 5.1
    assert directory.by_name(row.name).app_secret == "new"  # type: ignore[union-attr]
    accounts.update_instance(session, row.name, accounts.InstanceUpdate(app_secret="newer"), box)
    session.commit()
    directory.forget()
    assert directory.by_phone_number_ids([row.phone_number_id])[row.phone_number_id].app_secret == (
        "newer"
    )


def test_the_directory_without_a_box_decrypts_with_the_environment_s_key(
    sessions: Any, session: Session, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingest.intake import InstanceDirectory

    if not database_url.startswith("sqlite"):
        monkeypatch.setenv("INGEST_SECRET_KEY", TEST_SECRET_KEY)
    row = make_instance(session, app_secret="from-the-environment")
    unchecked = make_instance(session, app_secret=None)
    # As a row from before 0005 would be: no check, and no consent to unsigned webhooks.
    unchecked.allow_unsigned = False
    session.commit()

    directory = InstanceDirectory(sessions)
    route = directory.by_name(row.name)
    assert route is not None and route.app_secret == "from-the-environment"
    legacy = directory.by_name(unchecked.name)
    assert legacy is not None and not authenticate(legacy, BODY, Headers())
