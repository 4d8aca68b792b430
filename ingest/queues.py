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
MEDIA_QUEUES = (SMALL_MEDIA, LARGE_MEDIA)


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

    def queue_depths(self, queues: Sequence[str]) -> dict[str, int]:
        """Wake-ups waiting in each queue (not those a worker already holds).
        Raises :class:`SchedulerUnavailable` when the broker cannot say."""
        ...


class RecordingScheduler:
    """Keeps jobs in a list: for tests and for code paths that must not touch a broker."""

    def __init__(self) -> None:
        self.jobs: list[DownloadJob] = []

    def schedule(self, jobs: Sequence[DownloadJob]) -> None:
        self.jobs.extend(jobs)

    def queue_depths(self, queues: Sequence[str]) -> dict[str, int]:
        """What was scheduled and not yet taken with :meth:`take`."""
        return {name: sum(1 for job in self.jobs if job.queue == name) for name in queues}

    def take(self) -> list[DownloadJob]:
        """The jobs so far, as a worker would consume them: the queues are empty after."""
        taken, self.jobs = self.jobs, []
        return taken
