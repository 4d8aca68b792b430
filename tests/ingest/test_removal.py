"""Retention and erasure (ingest.removal) on both stores: local files and S3 over HTTP (the
moto server), each on SQLite and PostgreSQL. The object goes, the row stays as the audit."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest import removal
from ingest.intake import RoutedEvent, record_events
from ingest.media_rules import object_key
from ingest.models import Instance, MediaItem, MediaState, utcnow
from ingest.operations import Selection, redrive
from ingest.settings import Settings
from ingest.storage import LocalStorage, Storage, StorageError, storage_from_settings
from tests.factories import make_instance, make_media_item
from tests.ingest.test_intake import image

BODY = b"\xff\xd8\xff\xe0 a photo " * 100


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "media")
    return storage_from_settings(request.getfixturevalue("s3_settings"))


@dataclass
class Archive:
    sessions: sessionmaker[Session]
    storage: Storage
    instance_id: int
    instance_name: str

    def stored(
        self, *, days_old: float = 0.0, instance_id: int | None = None, **values: Any
    ) -> int:
        """A stored row whose object is really in the store."""
        with self.sessions.begin() as session:
            instance = session.get(Instance, instance_id or self.instance_id)
            assert instance is not None
            received = utcnow() - timedelta(days=days_old)
            item = make_media_item(
                session,
                instance,
                received_at=received,
                expires_at=received + timedelta(days=7),
                caption="happy birthday",
                filename="photo.jpg",
                sender="15550001111",
                **values,
            )
            key = object_key(instance.name, item.media_type, item.media_id or item.message_id)
            stored = self.storage.put(
                key,
                io.BytesIO(BODY),
                size=len(BODY),
                sha256=hashlib.sha256(BODY).hexdigest(),
                content_type="image/jpeg",
            )
            item.state = MediaState.STORED
            item.storage_key = stored.key
            item.storage_backend = stored.backend
            item.size = len(BODY)
            item.actual_sha256 = hashlib.sha256(BODY).hexdigest()
            item.stored_at = received
            return item.id

    def row(self, item_id: int) -> MediaItem:
        with self.sessions() as session:
            item = session.get(MediaItem, item_id)
            assert item is not None
            return item

    def has_object(self, key: str) -> bool:
        try:
            self.storage.head(key)
        except FileNotFoundError:
            return False
        return True


@pytest.fixture
def archive(sessions: sessionmaker[Session], storage: Storage) -> Iterator[Archive]:
    with sessions.begin() as session:
        instance = make_instance(session)
        ids = instance.id, instance.name
    yield Archive(sessions, storage, *ids)


def _retain(archive: Archive, days: int | None, instance_id: int | None = None) -> None:
    with archive.sessions.begin() as session:
        instance = session.get(Instance, instance_id or archive.instance_id)
        assert instance is not None
        instance.retention_days = days


# --- retention -----------------------------------------------------------------------------


def test_retention_deletes_old_objects_and_keeps_an_auditable_row(archive: Archive) -> None:
    old = archive.stored(days_old=31)
    recent = archive.stored(days_old=29)
    _retain(archive, 30)
    old_key = archive.row(old).storage_key
    assert old_key is not None and archive.has_object(old_key)

    report = removal.purge_past_retention(archive.sessions, archive.storage, utcnow())

    assert (report.purged, report.failed) == (1, 0)
    assert report.by_instance == {archive.instance_name: 1}
    assert not archive.has_object(old_key)
    row = archive.row(old)
    assert row.state == MediaState.PURGED
    assert row.removed_by == "retention: 30 days"
    assert row.removed_at is not None
    # The audit keeps what was archived: size, checksum, when it was stored.
    assert row.size == len(BODY) and row.actual_sha256 and row.stored_at is not None
    assert row.caption == "happy birthday"
    kept = archive.row(recent)
    assert kept.state == MediaState.STORED
    assert kept.storage_key is not None and archive.has_object(kept.storage_key)


def test_without_retention_nothing_is_ever_purged(archive: Archive) -> None:
    item = archive.stored(days_old=400)
    report = removal.purge_past_retention(archive.sessions, archive.storage, utcnow())
    assert report.purged == 0
    assert archive.row(item).state == MediaState.STORED


def test_a_dry_run_counts_and_changes_nothing(archive: Archive) -> None:
    items = [archive.stored(days_old=10) for _ in range(3)]
    _retain(archive, 7)
    report = removal.purge_past_retention(archive.sessions, archive.storage, utcnow(), dry_run=True)
    assert report.purged == 3
    for item in items:
        row = archive.row(item)
        assert row.state == MediaState.STORED
        assert row.storage_key is not None and archive.has_object(row.storage_key)


def test_retention_goes_through_every_batch_in_one_pass(archive: Archive) -> None:
    items = [archive.stored(days_old=10) for _ in range(5)]
    _retain(archive, 7)
    report = removal.purge_past_retention(archive.sessions, archive.storage, utcnow(), batch=2)
    assert report.purged == 5
    assert {archive.row(i).state for i in items} == {MediaState.PURGED}


def test_retention_is_per_instance(archive: Archive) -> None:
    with archive.sessions.begin() as session:
        other = make_instance(session).id
    mine = archive.stored(days_old=10)
    theirs = archive.stored(days_old=10, instance_id=other)
    _retain(archive, 7)
    removal.purge_past_retention(archive.sessions, archive.storage, utcnow())
    assert archive.row(mine).state == MediaState.PURGED
    assert archive.row(theirs).state == MediaState.STORED


def test_rows_of_one_batch_sharing_an_object_are_purged_with_it(archive: Archive) -> None:
    # Two messages carried the same media id: one object, two rows, both past retention.
    first = archive.stored(days_old=10, media_id="7070")
    key = archive.row(first).storage_key
    assert key is not None
    with archive.sessions.begin() as session:
        instance = session.get(Instance, archive.instance_id)
        assert instance is not None
        second = make_media_item(
            session,
            instance,
            media_id="7070",
            state=MediaState.STORED,
            storage_key=key,
            received_at=utcnow() - timedelta(days=10),
        ).id
    _retain(archive, 7)

    report = removal.purge_past_retention(archive.sessions, archive.storage, utcnow())

    assert report.purged == 2
    assert {archive.row(first).state, archive.row(second).state} == {MediaState.PURGED}
    assert not archive.has_object(key)


def test_a_failed_delete_leaves_the_row_stored_for_the_next_pass(archive: Archive) -> None:
    item = archive.stored(days_old=10)
    _retain(archive, 7)

    class Failing:
        def __getattr__(self, name: str) -> Any:
            return getattr(archive.storage, name)

        def delete(self, key: str) -> None:
            raise StorageError("store unavailable")

    report = removal.purge_past_retention(archive.sessions, Failing(), utcnow())  # type: ignore[arg-type]
    assert (report.purged, report.failed) == (0, 1)
    row = archive.row(item)
    assert row.state == MediaState.STORED and row.removed_at is None

    report = removal.purge_past_retention(archive.sessions, archive.storage, utcnow())
    assert report.purged == 1
    assert archive.row(item).state == MediaState.PURGED


# --- erasure -------------------------------------------------------------------------------


def test_erasure_deletes_the_object_and_keeps_who_and_when(archive: Archive) -> None:
    item = archive.stored()
    row = archive.row(item)
    key = row.storage_key
    assert key is not None

    erasure = removal.erase(
        archive.sessions,
        archive.storage,
        instance_id=archive.instance_id,
        message_id=row.message_id,
        by="token 7 (privacy desk)",
        now=utcnow(),
    )

    assert erasure.newly_erased and erasure.objects_deleted >= 1
    assert not archive.has_object(key)
    after = archive.row(item)
    assert after.state == MediaState.ERASED
    assert after.removed_by == "token 7 (privacy desk)"
    assert after.removed_at == erasure.erased_at
    # Personal fields and the way back to the bytes are gone; the audit stays.
    assert (after.caption, after.filename, after.sender, after.media_id) == (None,) * 4
    assert after.message_id == row.message_id and after.actual_sha256 == row.actual_sha256


def test_erasing_twice_keeps_the_first_who_and_when(archive: Archive) -> None:
    item = archive.stored()
    message_id = archive.row(item).message_id
    first = removal.erase(
        archive.sessions,
        archive.storage,
        instance_id=archive.instance_id,
        message_id=message_id,
        by="first",
        now=utcnow() - timedelta(minutes=5),
    )
    second = removal.erase(
        archive.sessions,
        archive.storage,
        instance_id=archive.instance_id,
        message_id=message_id,
        by="second",
        now=utcnow(),
    )
    assert not second.newly_erased
    assert (second.erased_at, second.erased_by) == (first.erased_at, "first")
    assert archive.row(item).removed_by == "first"


def test_erasing_an_unknown_message_is_not_found(archive: Archive) -> None:
    with pytest.raises(removal.NotFound):
        removal.erase(
            archive.sessions,
            archive.storage,
            instance_id=archive.instance_id,
            message_id="wamid.nobody",
            by="x",
            now=utcnow(),
        )


def test_an_erased_message_never_comes_back(archive: Archive, settings: Settings) -> None:
    item = archive.stored()
    row = archive.row(item)
    removal.erase(
        archive.sessions,
        archive.storage,
        instance_id=archive.instance_id,
        message_id=row.message_id,
        by="x",
        now=utcnow(),
    )
    # The provider redelivers the webhook for that message.
    with archive.sessions.begin() as session:
        recorded = record_events(
            session,
            [RoutedEvent(archive.instance_id, image(row.message_id))],
            settings=settings,
            received_at=utcnow(),
        )
    assert (recorded.new, recorded.rewoken) == (0, 0)
    with archive.sessions() as session:
        rows = session.scalars(
            select(MediaItem).where(MediaItem.message_id == row.message_id)
        ).all()
    assert [(r.id, r.state) for r in rows] == [(item, MediaState.ERASED)]
    # And redrive does not take it either.
    with archive.sessions.begin() as session:
        report = redrive(
            session,
            Selection(states=[s.value for s in MediaState]),
            utcnow(),
            dry_run=False,
        )
    assert report.redriven == 0
    assert archive.row(item).state == MediaState.ERASED


def test_an_object_another_row_still_holds_is_kept(archive: Archive) -> None:
    # Two messages carrying the same media id share one object.
    first = archive.stored(media_id="4242")
    with archive.sessions.begin() as session:
        instance = session.get(Instance, archive.instance_id)
        assert instance is not None
        source = session.get(MediaItem, first)
        assert source is not None
        second = make_media_item(
            session,
            instance,
            media_id="4242",
            state=MediaState.STORED,
            storage_key=source.storage_key,
            size=source.size,
        ).id
    key = archive.row(first).storage_key
    assert key is not None
    removal.erase(
        archive.sessions,
        archive.storage,
        instance_id=archive.instance_id,
        message_id=archive.row(first).message_id,
        by="x",
        now=utcnow(),
    )
    assert archive.has_object(key)
    assert archive.row(second).state == MediaState.STORED


def test_a_copy_uploaded_while_the_row_was_erased_is_deleted(archive: Archive) -> None:
    item = archive.stored()
    row = archive.row(item)
    key = row.storage_key
    assert key is not None
    with archive.sessions.begin() as session:
        session.get(MediaItem, item).state = MediaState.ERASED  # type: ignore[union-attr]
    assert removal.delete_if_removed(archive.sessions, archive.storage, item, key)
    assert not archive.has_object(key)


def test_a_copy_of_a_live_row_is_left_alone(archive: Archive) -> None:
    item = archive.stored()
    key = archive.row(item).storage_key
    assert key is not None
    assert not removal.delete_if_removed(archive.sessions, archive.storage, item, key)
    assert archive.has_object(key)
