"""How the relay and the reconciler hand work to the download workers, without knowing Celery.

SQL is the source of truth; a scheduled job is only a wake-up call. Losing one is harmless:
the reconciler finds the row again.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class WakeUp:
    """One message: rows of one queue, claimed together and run side by side by the worker
    process that takes it."""

    queue: str
    media_item_ids: tuple[int, ...]


def wake_ups(
    jobs: Sequence[DownloadJob], most: int, spread: int, at_once: int | None = None
) -> list[WakeUp]:
    """Group ``jobs`` into messages of rows of one queue. A message's rows are claimed
    together and run side by side on the process that takes it, ``at_once`` of them at a
    time (its row slots; ``spread``, the threads of a worker, when not given). So a message
    carries at most ``at_once`` rows, shared evenly over the fewest messages that hold them
    (a burst of more reaches several processes). A backlog of more than ``most * spread``
    rows, which keeps every thread busy anyway, goes ``most`` to a message: fewer messages,
    fewer claims. Large media always go one to a message: a row claimed behind a transfer of
    minutes would spend its lease waiting for a slot."""
    by_queue: dict[str, list[int]] = {}
    for job in jobs:
        by_queue.setdefault(job.queue, []).append(job.media_item_id)
    spread = max(spread, 1)
    at_once = max(at_once if at_once is not None else spread, 1)
    messages = []
    for queue, ids in by_queue.items():
        if queue == LARGE_MEDIA:
            size = 1
        else:
            at_most = most if len(ids) > most * spread else min(most, at_once)
            size = math.ceil(len(ids) / math.ceil(len(ids) / at_most))
        messages += [
            WakeUp(queue, tuple(ids[start : start + size])) for start in range(0, len(ids), size)
        ]
    return messages


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
