"""How the webhook hands work to the download workers, without knowing about Celery.

SQL is the source of truth; a scheduled job is only a wake-up call. Losing one is harmless:
the reconciler finds the row again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

SMALL_MEDIA = "media.small"
LARGE_MEDIA = "media.large"
MAINTENANCE = "maintenance"
ALL_QUEUES = (SMALL_MEDIA, LARGE_MEDIA, MAINTENANCE)


@dataclass(frozen=True)
class DownloadJob:
    media_item_id: int
    queue: str


class SchedulerUnavailable(Exception):
    """The broker could not take the jobs; the rows stay pending for the reconciler."""


class DownloadScheduler(Protocol):
    def schedule(self, jobs: Sequence[DownloadJob]) -> None:
        """Wake workers for these rows. Raises :class:`SchedulerUnavailable` on failure."""
        ...


class RecordingScheduler:
    """Keeps jobs in a list: for tests and for code paths that must not touch a broker."""

    def __init__(self) -> None:
        self.jobs: list[DownloadJob] = []

    def schedule(self, jobs: Sequence[DownloadJob]) -> None:
        self.jobs.extend(jobs)
