"""Deleting archived bytes on purpose, keeping the row as the audit: retention and erasure.

- **Retention** (:func:`purge_past_retention`): an instance with ``retention_days`` keeps
  stored media that many days from receipt. Past it, the object is deleted first and the row
  marked ``purged`` after, so a failed delete leaves a row that is still honest (``stored``,
  tried again next pass) and never an object no row points to.
- **Erasure** (:func:`erase`): a right-to-erasure request for one message. The row is marked
  ``erased`` first, with who asked and when, and the personal fields (caption, filename,
  sender) and the media id are cleared; then the objects are deleted. Marking first means
  nothing is served and no download records a copy from that moment on, and the row can
  never go back: a redelivered webhook finds it and changes nothing, redrive takes only
  failed or expired rows. A failed delete is an error to the caller, who repeats the
  request: erasing an erased row deletes its objects again (idempotent), without changing
  who or when.

A download that was uploading while its row was erased finds the row changed when it records
the copy and deletes what it uploaded (:func:`delete_if_removed`).

Objects are shared only by rows with the same key (same instance, type and media id): one is
deleted only when no other row that may still need it refers to it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Row, select
from sqlalchemy.orm import Session, sessionmaker

from ingest import media_rows
from ingest.db import session_scope
from ingest.media_rules import object_key
from ingest.models import REMOVED_STATES, Instance, MediaItem, MediaState
from ingest.storage import Storage, StorageError

log = logging.getLogger(__name__)

PURGE_BATCH = 500
# Rows that may still need an object under a key: being downloaded, or holding the copy.
_KEY_HOLDERS = (MediaState.PENDING, MediaState.DOWNLOADING, MediaState.STORED)


class NotFound(LookupError):
    """No such message for that instance."""


@dataclass(frozen=True)
class Erasure:
    instance: str
    message_id: str
    erased_at: datetime
    erased_by: str
    # False when the row was erased before: the objects were deleted again, nothing else.
    newly_erased: bool
    objects_deleted: int


@dataclass
class PurgeReport:
    purged: int = 0
    failed: int = 0
    by_instance: dict[str, int] = field(default_factory=dict)


def _keys_of(item: MediaItem, instance_name: str) -> set[str]:
    """Where this row's bytes are, or would be written by a download in flight."""
    keys = {item.storage_key} if item.storage_key else set()
    reference = item.media_id or item.message_id
    keys.add(object_key(instance_name, item.media_type, reference))
    return keys


def _keys_held_elsewhere(
    session: Session, keys: Collection[str], item_ids: Collection[int]
) -> set[str]:
    """Which of ``keys`` a row other than ``item_ids`` may still need (one query)."""
    if not keys:
        return set()
    return set(
        session.scalars(
            select(MediaItem.storage_key)
            .where(MediaItem.storage_key.in_(sorted(keys)))
            .where(MediaItem.id.not_in(sorted(item_ids)))
            .where(MediaItem.state.in_(_KEY_HOLDERS))
            .distinct()
        )
    )


def _delete_unshared(
    sessions: sessionmaker[Session], storage: Storage, keys: set[str], item_id: int
) -> int:
    with session_scope(sessions) as session:
        unshared = sorted(keys - _keys_held_elsewhere(session, keys, [item_id]))
    for key in unshared:
        storage.delete(key)  # StorageError propagates: the caller must know
    return len(unshared)


def erase(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    instance_id: int,
    message_id: str,
    by: str,
    now: datetime,
) -> Erasure:
    """Erase one message's media. Raises :class:`NotFound`, or :class:`StorageError` when an
    object could not be deleted (the row is erased already; repeat the call)."""
    with session_scope(sessions) as session:
        item = session.execute(
            select(MediaItem)
            .where(MediaItem.instance_id == instance_id, MediaItem.message_id == message_id)
            .with_for_update()
        ).scalar_one_or_none()
        if item is None:
            raise NotFound(message_id)
        instance_name = item.instance.name
        keys = _keys_of(item, instance_name)
        item_id = item.id
        newly = item.state != MediaState.ERASED
        if newly:
            media_rows.erase(session, item_id, by=by[:200], now=now)
            erased_at, erased_by = now, by[:200]
        else:
            erased_at, erased_by = item.removed_at or now, item.removed_by or by
    deleted = _delete_unshared(sessions, storage, keys, item_id)
    log.warning(
        "erased instance=%s message=%s by=%s objects_deleted=%d%s",
        instance_name,
        message_id,
        erased_by,
        deleted,
        "" if newly else " (erased before; objects deleted again)",
    )
    return Erasure(instance_name, message_id, erased_at, erased_by, newly, deleted)


def purge_past_retention(
    sessions: sessionmaker[Session],
    storage: Storage,
    now: datetime,
    *,
    batch: int = PURGE_BATCH,
    dry_run: bool = False,
) -> PurgeReport:
    """Delete the objects of stored rows older than their instance's retention, and mark
    those rows ``purged``, ``batch`` rows at a time. ``dry_run`` counts what would go and
    changes nothing."""
    report = PurgeReport()
    with session_scope(sessions) as session:
        kept = session.execute(
            select(Instance.id, Instance.name, Instance.retention_days).where(
                Instance.retention_days.is_not(None)
            )
        ).all()
    for instance_id, name, days in kept:
        assert days is not None  # selected for it
        cutoff = now - timedelta(days=days)
        after_id = 0
        while True:
            # By id, from where the last batch ended: rows whose object could not be deleted
            # are passed over (tried again next pass), never fetched again in this one.
            with session_scope(sessions) as session:
                rows = session.execute(
                    select(MediaItem.id, MediaItem.storage_key)
                    .where(MediaItem.instance_id == instance_id)
                    .where(MediaItem.state == MediaState.STORED)
                    .where(MediaItem.received_at < cutoff)
                    .where(MediaItem.id > after_id)
                    .order_by(MediaItem.id)
                    .limit(batch)
                ).all()
            if not rows:
                break
            after_id = rows[-1][0]
            count = len(rows) if dry_run else _purge_rows(sessions, storage, rows, days, now)
            report.failed += 0 if dry_run else len(rows) - count
            report.purged += count
            report.by_instance[name] = report.by_instance.get(name, 0) + count
        if report.by_instance.get(name):
            log.info(
                "retention: instance=%s %s=%d (older than %s days)",
                name,
                "would purge" if dry_run else "purged",
                report.by_instance[name],
                days,
            )
    return report


def _purge_rows(
    sessions: sessionmaker[Session],
    storage: Storage,
    rows: Sequence[Row[int, str | None]],
    days: int,
    now: datetime,
) -> int:
    """Delete the objects of these stored rows, then mark purged the rows whose object went.
    Returns how many rows were marked."""
    with session_scope(sessions) as session:
        # One query for the batch: rows of the batch may share a key, rows outside it keep it.
        kept = _keys_held_elsewhere(
            session, {key for _, key in rows if key}, [item_id for item_id, _ in rows]
        )
    gone: list[int] = []
    for item_id, key in rows:
        try:
            if key and key not in kept:
                storage.delete(key)
        except StorageError as exc:
            log.warning("retention: deleting item=%s failed (%s)", item_id, exc)
            continue
        gone.append(item_id)
    if not gone:
        return 0
    with session_scope(sessions) as session:
        return media_rows.purge(session, gone, removed_by=f"retention: {days} days", now=now)


def delete_if_removed(
    sessions: sessionmaker[Session], storage: Storage, item_id: int, key: str
) -> bool:
    """After a download could not record its copy: if the row was erased or purged in the
    meantime, delete the object just uploaded. True when it did."""
    with session_scope(sessions) as session:
        state = session.execute(
            select(MediaItem.state).where(MediaItem.id == item_id)
        ).scalar_one_or_none()
        if state not in REMOVED_STATES:
            return False
        if _keys_held_elsewhere(session, [key], [item_id]):
            return False
    storage.delete(key)
    log.warning("item=%s was %s during its upload; the copy was deleted", item_id, state)
    return True
