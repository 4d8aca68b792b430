"""What an operator asks of the backlog: how it stands (`stats`) and putting failed or
expired rows back in line (`redrive`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ingest import accounts, media_rows
from ingest.media_rows import ACTIVE_STATES
from ingest.media_rows import REDRIVABLE_AFTER_EXPIRY as REDRIVABLE_AFTER_EXPIRY
from ingest.media_rows import REDRIVABLE_STATES as REDRIVABLE_STATES
from ingest.models import CallbackEvent, Instance, MediaItem, MediaState

AT_RISK_WINDOWS = {"24h": timedelta(hours=24), "1h": timedelta(hours=1)}
BATCH = 500
SAMPLE_ROWS = 10


@dataclass(frozen=True)
class StateCount:
    instance: str
    state: str
    reason: str | None
    count: int


@dataclass(frozen=True)
class CallbackCount:
    """One instance's downstream callback events by delivery state."""

    instance: str
    pending: int = 0
    delivered: int = 0
    failed: int = 0
    # Age of its oldest event still pending (None: none pending).
    oldest_pending_seconds: float | None = None


@dataclass(frozen=True)
class Stats:
    now: datetime
    counts: list[StateCount]
    # Age of the oldest pending or downloading row, by when it was received.
    oldest_pending_seconds: float | None
    # Rows neither stored nor expired whose 7 days end within each window from now.
    at_risk: dict[str, int]
    # Instances that have callback events, by name.
    callbacks: list[CallbackCount] = field(default_factory=list)


def stats(session: Session, now: datetime) -> Stats:
    rows = session.execute(
        select(Instance.name, MediaItem.state, MediaItem.failure_reason, func.count())
        .join(Instance, Instance.id == MediaItem.instance_id)
        .group_by(Instance.name, MediaItem.state, MediaItem.failure_reason)
    ).all()
    counts = sorted(
        (
            StateCount(str(name), str(state), reason, int(count))
            for name, state, reason, count in rows
        ),
        key=lambda c: (c.instance, c.state, c.reason or ""),
    )
    oldest = session.scalar(
        select(func.min(MediaItem.received_at)).where(MediaItem.state.in_(ACTIVE_STATES))
    )
    not_done = MediaItem.state.not_in((MediaState.STORED, MediaState.EXPIRED))
    at_risk = {
        label: int(
            session.scalar(
                select(func.count())
                .select_from(MediaItem)
                .where(not_done, MediaItem.expires_at > now, MediaItem.expires_at <= now + window)
            )
            or 0
        )
        for label, window in AT_RISK_WINDOWS.items()
    }
    age = max((now - oldest).total_seconds(), 0.0) if oldest is not None else None
    return Stats(
        now=now,
        counts=counts,
        oldest_pending_seconds=age,
        at_risk=at_risk,
        callbacks=_callback_counts(session, now),
    )


def _callback_counts(session: Session, now: datetime) -> list[CallbackCount]:
    rows = session.execute(
        select(Instance.name, CallbackEvent.state, func.count(), func.min(CallbackEvent.created_at))
        .join(Instance, Instance.id == CallbackEvent.instance_id)
        .group_by(Instance.name, CallbackEvent.state)
    ).all()
    by_instance: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    for name, state, count, first in rows:
        by_instance.setdefault(str(name), {})[str(state)] = int(count)
        if state == "pending" and first is not None:
            oldest[str(name)] = max((now - first).total_seconds(), 0.0)
    return [
        CallbackCount(
            instance=name,
            pending=states.get("pending", 0),
            delivered=states.get("delivered", 0),
            failed=states.get("failed", 0),
            oldest_pending_seconds=oldest.get(name),
        )
        for name, states in sorted(by_instance.items())
    ]


@dataclass(frozen=True)
class Selection:
    instance: str | None = None
    states: tuple[str, ...] = tuple(s.value for s in REDRIVABLE_STATES)
    reasons: tuple[str, ...] = ()
    since: datetime | None = None  # received_at >= since
    until: datetime | None = None  # received_at < until


@dataclass(frozen=True)
class SampleRow:
    id: int
    instance: str
    message_id: str
    state: str
    reason: str | None
    received_at: datetime


GroupKey = tuple[str, str, str | None]  # instance, state, reason


@dataclass
class RedriveReport:
    dry_run: bool
    matched: int = 0
    # Rows eligible when selected; on a real run, `redriven` of them were changed and
    # `skipped` had moved on (another process changed their state) by the update.
    eligible: int = 0
    redriven: int = 0
    skipped: int = 0
    refused: int = 0
    groups: Counter[GroupKey] = field(default_factory=Counter)
    refused_groups: Counter[GroupKey] = field(default_factory=Counter)
    sample: list[SampleRow] = field(default_factory=list)


def redrive(session: Session, selection: Selection, now: datetime, dry_run: bool) -> RedriveReport:
    """Put the selected failed or expired rows back to ``pending``, due now, with a fresh
    attempt count and no wake-up recorded, so the reconciler's next pass publishes them.

    Rows whose media id is past its 7 days are refused (counted, never changed) unless their
    failure reason is in :data:`REDRIVABLE_AFTER_EXPIRY`. Each batch is one ``UPDATE``
    guarded by the state and the expiry, so a row that moved on since it was read is left
    alone. The caller commits.
    """
    states = [s for s in selection.states if s in {m.value for m in REDRIVABLE_STATES}]
    query = (
        select(
            MediaItem.id,
            Instance.name,
            MediaItem.message_id,
            MediaItem.state,
            MediaItem.failure_reason,
            MediaItem.received_at,
            MediaItem.expires_at,
        )
        .join(Instance, Instance.id == MediaItem.instance_id)
        .where(MediaItem.state.in_(states))
        .order_by(MediaItem.id)
    )
    if selection.instance is not None:
        query = query.where(
            MediaItem.instance_id == accounts.get_instance(session, selection.instance).id
        )
    if selection.reasons:
        query = query.where(MediaItem.failure_reason.in_(selection.reasons))
    if selection.since is not None:
        query = query.where(MediaItem.received_at >= selection.since)
    if selection.until is not None:
        query = query.where(MediaItem.received_at < selection.until)

    report = RedriveReport(dry_run=dry_run)
    eligible: list[int] = []
    for item_id, name, message_id, state, reason, received_at, expires_at in session.execute(query):
        report.matched += 1
        key: GroupKey = (str(name), str(state), reason)
        fixable = state == MediaState.FAILED and reason in REDRIVABLE_AFTER_EXPIRY
        if expires_at <= now and not fixable:
            report.refused += 1
            report.refused_groups[key] += 1
            continue
        report.eligible += 1
        report.groups[key] += 1
        eligible.append(item_id)
        if len(report.sample) < SAMPLE_ROWS:
            report.sample.append(
                SampleRow(item_id, str(name), message_id, str(state), reason, received_at)
            )
    if dry_run:
        return report

    for start in range(0, len(eligible), BATCH):
        batch = eligible[start : start + BATCH]
        report.redriven += media_rows.redrive(session, batch, states, now)
    report.skipped = report.eligible - report.redriven
    return report
