"""The retention task: beat's hourly trigger for :func:`ingest.removal.purge_past_retention`,
and for deleting old delivered or failed callback events (:func:`ingest.callbacks.prune`).

One pass per period for the whole deployment, whatever the number of beats: the pass takes a
turn in SQL first (as the reconciler does), so a second beat, or an operator's
`ingest media purge` at the same moment, only finds rows already purged.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from celery import Task, shared_task

from ingest import callbacks, logs
from ingest.db import session_scope
from ingest.models import utcnow
from ingest.pipeline import new_lease_owner
from ingest.reconciler import take_turn
from ingest.removal import purge_past_retention
from tasks.celery_app import RETENTION_INTERVAL, RETENTION_TASK
from tasks.media import runtime

RETENTION_TURN = "retention"


@shared_task(name=RETENTION_TASK, bind=True)
def purge_retention(self: Task) -> dict[str, Any] | None:
    """Delete stored media past its instance's retention; None when it was not our turn."""
    with logs.task_context(self.request.id):
        services = runtime(self.app).services
        now = utcnow()
        period = RETENTION_INTERVAL - timedelta(minutes=5)
        if not take_turn(
            services.sessions, RETENTION_TURN, owner=new_lease_owner(), now=now, period=period
        ):
            return None
        report = asdict(purge_past_retention(services.sessions, services.storage, now))
        with session_scope(services.sessions) as session:
            report["callback_events_pruned"] = callbacks.prune(session, now)
        return report
