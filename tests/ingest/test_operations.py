from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from ingest import media_rows
from ingest.accounts import RegistryError
from ingest.models import Instance, MediaItem, MediaState, utcnow
from ingest.operations import Selection, redrive, stats
from tests.factories import make_instance, make_media_item


class Rows:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        with sessions.begin() as session:
            first = make_instance(session)
            second = make_instance(session)
            self.names = {first.id: first.name, second.id: second.name}
            self.instance_id, self.other_id = first.id, second.id

    def add(self, instance_id: int | None = None, **values: Any) -> int:
        with self.sessions.begin() as session:
            instance = session.get(Instance, instance_id or self.instance_id)
            assert instance is not None
            return make_media_item(session, instance, **values).id

    def get(self, item_id: int) -> MediaItem:
        with self.sessions() as session:
            item = session.get(MediaItem, item_id)
            assert item is not None
            return item


@pytest.fixture
def rows(sessions: sessionmaker[Session]) -> Rows:
    return Rows(sessions)


def _failed(rows: Rows, reason: str = "provider_error", **values: Any) -> int:
    values.setdefault("state", MediaState.FAILED)
    values.setdefault("failure_reason", reason)
    return rows.add(**values)


def test_stats_counts_by_instance_state_and_reason(
    rows: Rows, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    rows.add(received_at=now - timedelta(hours=2))
    rows.add(state=MediaState.DOWNLOADING, received_at=now - timedelta(hours=3))
    rows.add(state=MediaState.STORED, received_at=now - timedelta(days=2))
    _failed(rows, "too_large")
    _failed(rows, "too_large")
    rows.add(rows.other_id, state=MediaState.STORED)

    with sessions() as session:
        result = stats(session, now)

    first, second = rows.names[rows.instance_id], rows.names[rows.other_id]
    counted = {(c.instance, c.state, c.reason): c.count for c in result.counts}
    assert counted == {
        (first, "pending", None): 1,
        (first, "downloading", None): 1,
        (first, "stored", None): 1,
        (first, "failed", "too_large"): 2,
        (second, "stored", None): 1,
    }
    assert result.oldest_pending_seconds == pytest.approx(3 * 3600, abs=1)


def test_stats_at_risk_counts_unfinished_rows_near_their_seven_days(
    rows: Rows, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    rows.add(expires_at=now + timedelta(minutes=30))  # both windows
    _failed(rows, expires_at=now + timedelta(hours=5))  # 24 h only
    rows.add(expires_at=now + timedelta(days=3))  # neither
    rows.add(state=MediaState.STORED, expires_at=now + timedelta(minutes=5))  # stored
    rows.add(state=MediaState.EXPIRED, expires_at=now - timedelta(minutes=5))  # gone

    with sessions() as session:
        result = stats(session, now)

    assert result.at_risk == {"24h": 2, "1h": 1}


def test_stats_of_an_empty_database(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        result = stats(session, utcnow())
    assert result.counts == [] and result.oldest_pending_seconds is None
    assert result.at_risk == {"24h": 0, "1h": 0}


def test_redrive_puts_failed_and_expired_rows_back_due_now(
    rows: Rows, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    failed = _failed(
        rows,
        attempts=5,
        lease_losses=3,
        last_error="400: bad",
        lease_owner="w1",
        lease_until=now - timedelta(minutes=1),
        enqueued_at=now - timedelta(hours=1),
        next_attempt_at=now + timedelta(days=1),
    )
    # Given up early (a retry would have landed past the 7 days): the id still lives.
    expired = rows.add(state=MediaState.EXPIRED, expires_at=now + timedelta(hours=1))
    stored = rows.add(state=MediaState.STORED)
    pending = rows.add()

    with sessions.begin() as session:
        report = redrive(session, Selection(), now, dry_run=False)

    assert (report.matched, report.redriven, report.refused, report.skipped) == (2, 2, 0, 0)
    for item_id in (failed, expired):
        item = rows.get(item_id)
        assert item.state == MediaState.PENDING
        assert item.next_attempt_at == now and item.attempts == 0 and item.lease_losses == 0
        assert item.failure_reason is None and item.last_error is None
        assert item.lease_owner is None and item.lease_until is None
        assert item.enqueued_at is None
    assert rows.get(stored).state == MediaState.STORED
    assert rows.get(pending).next_attempt_at != now


def test_redrive_selects_by_instance_state_reason_and_time(
    rows: Rows, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    hour_ago = now - timedelta(hours=1)
    wanted = _failed(rows, "too_large", received_at=hour_ago)
    other_reason = _failed(rows, "provider_error", received_at=hour_ago)
    too_old = _failed(rows, "too_large", received_at=now - timedelta(days=1))
    too_new = _failed(rows, "too_large", received_at=now)
    other_instance = _failed(rows, "too_large", received_at=hour_ago, instance_id=rows.other_id)
    expired = rows.add(
        state=MediaState.EXPIRED, received_at=hour_ago, expires_at=now + timedelta(hours=1)
    )
    selection = Selection(
        instance=rows.names[rows.instance_id],
        states=("failed",),
        reasons=("too_large",),
        since=now - timedelta(hours=2),
        until=now - timedelta(minutes=1),
    )

    with sessions.begin() as session:
        report = redrive(session, selection, now, dry_run=False)

    assert report.redriven == 1
    assert rows.get(wanted).state == MediaState.PENDING
    for item_id in (other_reason, too_old, too_new, other_instance, expired):
        assert rows.get(item_id).state != MediaState.PENDING


def test_redrive_refuses_media_ids_past_their_seven_days(
    rows: Rows, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    gone = now - timedelta(minutes=1)
    expired = rows.add(state=MediaState.EXPIRED, expires_at=gone)
    # Not even the reasons a fresh URL fixes: the URL comes from the id, which is gone.
    mismatch = _failed(rows, "checksum_mismatch", expires_at=gone)
    live = _failed(rows, "checksum_mismatch")

    with sessions.begin() as session:
        report = redrive(session, Selection(), now, dry_run=False)

    assert (report.redriven, report.refused) == (1, 2)
    name = rows.names[rows.instance_id]
    assert report.refused_groups == {
        (name, "expired", None): 1,
        (name, "failed", "checksum_mismatch"): 1,
    }
    assert rows.get(expired).state == MediaState.EXPIRED
    assert rows.get(mismatch).state == MediaState.FAILED
    assert rows.get(live).state == MediaState.PENDING


def test_redrive_dry_run_reports_and_changes_nothing(
    rows: Rows, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    ids = [_failed(rows, "too_large") for _ in range(12)]
    rows.add(state=MediaState.EXPIRED, expires_at=now - timedelta(days=1))

    with sessions.begin() as session:
        report = redrive(session, Selection(), now, dry_run=True)

    name = rows.names[rows.instance_id]
    assert (report.eligible, report.redriven, report.refused) == (12, 0, 1)
    assert report.groups == {(name, "failed", "too_large"): 12}
    assert [row.id for row in report.sample] == ids[:10]
    assert all(rows.get(item_id).state == MediaState.FAILED for item_id in ids)


def test_redrive_leaves_a_row_that_moved_on_before_the_update(
    rows: Rows, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    item_id = _failed(rows)

    with sessions.begin() as session:
        planned = redrive(session, Selection(), now, dry_run=True)
    assert planned.eligible == 1
    with sessions.begin() as session:
        # Someone else redrives it and a worker stores it in between.
        session.execute(
            update(MediaItem).where(MediaItem.id == item_id).values(state=MediaState.STORED)
        )
        report = redrive(session, Selection(), now, dry_run=False)

    assert report.matched == 0 and report.redriven == 0
    assert rows.get(item_id).state == MediaState.STORED


def test_redrive_guard_skips_rows_changed_between_select_and_update(
    rows: Rows,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite's BEGIN IMMEDIATE holds every other writer off: no race to lose")
    now = utcnow()
    item_id = _failed(rows)
    original = media_rows._fixable_after_expiry

    def race(at: Any) -> Any:
        # Runs after the rows were read, before the UPDATE is sent.
        with sessions.begin() as other:
            other.execute(
                update(MediaItem).where(MediaItem.id == item_id).values(state=MediaState.STORED)
            )
        return original(at)

    monkeypatch.setattr(media_rows, "_fixable_after_expiry", race)
    with sessions.begin() as session:
        report = redrive(session, Selection(), now, dry_run=False)

    assert (report.eligible, report.redriven, report.skipped) == (1, 0, 1)
    assert rows.get(item_id).state == MediaState.STORED


def test_redrive_unknown_instance(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(RegistryError, match="no instance named"):
        redrive(session, Selection(instance="nope"), utcnow(), dry_run=True)
