"""The safety net, run about once a minute: SQL says what must happen, the broker may forget.

Every worker process offers to run the pass from a thread of its own
(:class:`ReconcilerLoop`), so it never waits behind downloads and does not depend on one beat
process; a row in ``maintenance_turns`` lets exactly one offer per interval run it
(:func:`reconcile_if_its_turn`). Beat's scheduled task takes the same turn, so any number of
beats and workers is harmless.

One pass, each step its own short transaction:

1. expire rows whose media id passed its 7 days without a copy (and no live lease);
2. give up on rows whose lease ran out ``max_lease_losses`` times: a row that keeps
   killing its worker (``failed``, ``worker_lost``); rows of steps 1 and 2 are announced
   to their instance's callback URL in the same transaction (ingest.callbacks);
3. put the other rows with a lapsed lease back to ``pending``, due now, one more loss
   counted;
4. purge signed URLs that are stale or no longer needed;
5. wake the rows that are due and have no recent wake-up: ``enqueued_at`` older than the
   moment they became due (a retry's backoff ended after its last wake-up), or older than
   one lease (that wake-up was lost), or older than one interval while their queue is empty
   (nothing in the broker can still wake them: Redis was flushed or restarted empty). A
   backlog thus gets one wake-up per row, not one per minute per row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ingest import callbacks, media_rows, metrics
from ingest.db import row_count, session_scope
from ingest.intake import wake_timeout
from ingest.media_rows import ACTIVE_STATES
from ingest.media_rules import queue_for
from ingest.models import (
    CallbackEvent,
    MaintenanceTurn,
    MediaItem,
    MediaState,
    MediaType,
    utcnow,
)
from ingest.periodic import PeriodicThread
from ingest.queues import MEDIA_QUEUES, DownloadJob, DownloadScheduler, SchedulerUnavailable
from ingest.retry_policy import FAILURE_REASONS
from ingest.settings import Settings
from ingest.wake_relay import forget_unsent

log = logging.getLogger(__name__)

# Wake-ups published per pass; the next pass (a minute later) takes the rest.
DEFAULT_BATCH = 1000

RECONCILE_TURN = "reconcile"
# A turn lasts a little less than the interval, so the next offer (about an interval later,
# from whichever process) finds it free even with timer drift.
TURN_FRACTION = 0.8


@dataclass(frozen=True)
class ReconcileReport:
    expired: int
    worker_lost: int
    released: int
    purged_urls: int
    woken: int
    publish_failed: bool = False


def reconcile_if_its_turn(
    sessions: sessionmaker[Session],
    scheduler: DownloadScheduler,
    settings: Settings,
    *,
    owner: str,
    now: datetime | None = None,
) -> ReconcileReport | None:
    """Run one pass unless another process ran one less than an interval ago."""
    now = now or utcnow()
    period = timedelta(seconds=settings.reconcile_interval_seconds * TURN_FRACTION)
    if not take_turn(sessions, RECONCILE_TURN, owner=owner, now=now, period=period):
        return None
    return reconcile(sessions, scheduler, settings, now=now)


def take_turn(
    sessions: sessionmaker[Session], name: str, *, owner: str, now: datetime, period: timedelta
) -> bool:
    """Claim the periodic job ``name`` until ``now + period``; False if someone holds it."""
    with session_scope(sessions) as session:
        taken = session.execute(
            update(MaintenanceTurn)
            .where(MaintenanceTurn.name == name)
            .where(MaintenanceTurn.until <= now)
            .values(owner=owner[:100], until=now + period)
            .execution_options(synchronize_session=False)
        )
        if row_count(taken) == 1:
            return True
        if session.get(MaintenanceTurn, name) is not None:
            return False
    try:  # the first turn ever: the row does not exist yet
        with session_scope(sessions) as session:
            session.add(MaintenanceTurn(name=name, owner=owner[:100], until=now + period))
    except IntegrityError:
        return False  # another process created it first, and holds the turn
    return True


class ReconcilerLoop(PeriodicThread):
    """Offers to run the reconciler about once per interval (see :mod:`ingest.periodic`).

    Runs in every worker process; the turn in SQL means the deployment runs one pass per
    interval however many workers offer.
    """

    def __init__(self, run_pass: Callable[[], object], interval_seconds: float) -> None:
        super().__init__("reconciler", run_pass, interval_seconds)


def reconcile(
    sessions: sessionmaker[Session],
    scheduler: DownloadScheduler,
    settings: Settings,
    *,
    now: datetime | None = None,
    batch: int = DEFAULT_BATCH,
) -> ReconcileReport:
    now = now or utcnow()
    expired = expire_overdue(sessions, now)
    lost, released = recover_lapsed_leases(sessions, settings, now)
    purged = purge_urls(sessions, now)
    # One count of the queues per pass: it decides which wake-ups are lost, and, with what
    # this pass sent, it is the depth the backlog gauge shows.
    depths = _queue_depths(scheduler)
    sent, publish_failed = wake_due(sessions, scheduler, settings, now, depths, batch=batch)
    metrics.LEASE_LOSSES.inc(lost + released)
    if depths is not None:
        depths = {
            name: depth + sum(1 for job in sent if job.queue == name)
            for name, depth in depths.items()
        }
    measure_backlog(sessions, now, depths)
    woken = len(sent)
    report = ReconcileReport(expired, lost, released, purged, woken, publish_failed)
    log.info(
        "reconcile expired=%d worker_lost=%d released=%d purged_urls=%d woken=%d%s",
        expired,
        lost,
        released,
        purged,
        woken,
        " (broker unavailable)" if publish_failed else "",
    )
    return report


AT_RISK_WINDOWS = {"24h": timedelta(hours=24), "1h": timedelta(hours=1)}


def measure_backlog(
    sessions: sessionmaker[Session], now: datetime, depths: dict[str, int] | None
) -> None:
    """Set the backlog gauges: rows by state and reason, rows at risk of their 7 days, the
    oldest unfinished row, the queues' ``depths`` (None: the broker could not say), callback
    events by state. Once per pass, so scrapes cost nothing."""
    unfinished = MediaItem.state.in_(ACTIVE_STATES)
    labels = list(AT_RISK_WINDOWS)
    with session_scope(sessions) as session:
        counts = session.execute(
            select(MediaItem.state, MediaItem.failure_reason, func.count()).group_by(
                MediaItem.state, MediaItem.failure_reason
            )
        ).all()
        # The unfinished rows' figures in one statement: a count per window and the oldest.
        oldest, *risk = session.execute(
            select(
                func.min(MediaItem.received_at),
                *(
                    func.count().filter(MediaItem.expires_at <= now + AT_RISK_WINDOWS[label])
                    for label in labels
                ),
            ).where(unfinished)
        ).one()
        callback_counts = session.execute(
            select(CallbackEvent.state, func.count()).group_by(CallbackEvent.state)
        ).all()
    at_risk = dict(zip(labels, (int(count or 0) for count in risk), strict=True))
    # Every known pair is written each pass, zeros included: with several processes taking
    # turns, a pair only one of them ever wrote would otherwise keep its old value.
    figures = {(state.value, ""): 0 for state in MediaState}
    figures.update({(MediaState.FAILED.value, reason): 0 for reason in FAILURE_REASONS})
    for row_state, reason, count in counts:
        figures[(str(row_state), reason or "")] = int(count)
    for (state_label, reason_label), count in figures.items():
        metrics.MEDIA_ITEMS.labels(state_label, reason_label).set(count)
    for label, count in at_risk.items():
        metrics.MEDIA_AT_RISK.labels(label).set(count)
    metrics.OLDEST_PENDING_SECONDS.set(
        max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
    )
    for queue, depth in (depths or {}).items():
        metrics.QUEUE_DEPTH.labels(queue).set(depth)
    events = dict.fromkeys((state.value for state in callbacks.EventState), 0)
    events.update({str(state): int(count) for state, count in callback_counts})
    for state_label, count in events.items():
        metrics.CALLBACK_EVENTS.labels(state_label).set(count)


def expire_overdue(sessions: sessionmaker[Session], now: datetime) -> int:
    """Rows past their 7 days without a copy become ``expired``, announced downstream in the
    same transaction."""
    with session_scope(sessions) as session:
        expired = media_rows.expire(session, now)
        if expired:
            callbacks.announce(session, expired, now)
        return len(expired)


def recover_lapsed_leases(
    sessions: sessionmaker[Session], settings: Settings, now: datetime
) -> tuple[int, int]:
    """(rows failed as worker_lost, rows put back to pending), in one transaction; the
    failed ones are announced downstream in it."""
    with session_scope(sessions) as session:
        lost = media_rows.give_up_lapsed(session, now, settings.max_lease_losses)
        if lost:
            callbacks.announce(session, lost, now)
        released = media_rows.release_lapsed(session, now)
        return len(lost), released


def purge_urls(sessions: sessionmaker[Session], now: datetime) -> int:
    """Signed URLs are kept only until used or stale."""
    with session_scope(sessions) as session:
        return media_rows.purge_urls(session, now)


def wake_due(
    sessions: sessionmaker[Session],
    scheduler: DownloadScheduler,
    settings: Settings,
    now: datetime,
    depths: dict[str, int] | None,
    *,
    batch: int = DEFAULT_BATCH,
) -> tuple[list[DownloadJob], bool]:
    """Publish one wake-up per due row without a recent one. Returns (the wake-ups sent,
    publish_failed). ``depths``: the media queues' depths, None when the broker cannot say.

    ``enqueued_at`` is written before publishing; if the broker refuses, it is cleared again
    so the next pass tries at once (a duplicate wake-up is harmless, a lost one only slow).

    A wake-up older than a lease is presumed lost. So is one older than the wake timeout (one
    interval) when its queue is empty: nothing left in the broker can wake that row, as after
    Redis lost its data. While a queue holds messages its rows wait their turn, so a normal
    backlog is never flooded with duplicates.
    """
    lost_after = now - timedelta(seconds=settings.lease_seconds)
    empty_queues = frozenset(name for name, depth in (depths or {}).items() if depth == 0)
    stale_after = now - wake_timeout(settings) if empty_queues else lost_after
    with session_scope(sessions) as session:
        rows = session.execute(
            select(
                MediaItem.id,
                MediaItem.media_type,
                MediaItem.declared_size,
                MediaItem.enqueued_at,
                MediaItem.next_attempt_at,
            )
            .where(MediaItem.state == MediaState.PENDING)
            .where(MediaItem.next_attempt_at <= now)
            .where(
                or_(
                    MediaItem.enqueued_at.is_(None),
                    MediaItem.enqueued_at < MediaItem.next_attempt_at,
                    MediaItem.enqueued_at < max(lost_after, stale_after),
                )
            )
            .order_by(MediaItem.next_attempt_at, MediaItem.id)
            .limit(batch)
        ).all()
        jobs = []
        for item_id, media_type, size, enqueued_at, next_attempt_at in rows:
            queue = queue_for(MediaType(media_type), size, settings.large_media_bytes)
            if (
                enqueued_at is not None
                and enqueued_at >= next_attempt_at
                and enqueued_at >= lost_after
                and queue not in empty_queues
            ):
                continue  # young enough, and its queue still holds wake-ups: not lost
            jobs.append(DownloadJob(media_item_id=item_id, queue=queue))
        if jobs:
            media_rows.wake(session, [job.media_item_id for job in jobs], now)
    if not jobs:
        return [], False
    try:
        scheduler.schedule(jobs)
    except SchedulerUnavailable as exc:
        log.warning("reconcile: broker unavailable (%s); %d wake-up(s) not sent", exc, len(jobs))
        forget_unsent(sessions, jobs, "reconcile")
        return [], True
    except Exception:
        # Not an outage but a bug, so it stays loud; still, the stamps just written must not
        # make these rows wait a whole lease for wake-ups that never left.
        forget_unsent(sessions, jobs, "reconcile")
        raise
    return jobs, False


def _queue_depths(scheduler: DownloadScheduler) -> dict[str, int] | None:
    """The media queues' depths, or None when the broker cannot say (then only the
    lease-long rule finds lost wake-ups)."""
    try:
        return scheduler.queue_depths(MEDIA_QUEUES)
    except SchedulerUnavailable:
        return None
