"""How a worker process ends when its consumer dies: soon, and with a non-zero status.

Celery 5.7 handles an exception its consumer cannot recover from ("Unrecoverable error",
e.g. the broker-outage ``AttributeError``, see tasks.redis_transport) with a
*warm* stop, ``WorkController.stop(exitcode=1)``:

- the threads pool's stop (``ThreadPoolExecutor.shutdown``) waits for every task in flight,
  with no bound: the threads pool enforces no time limit, so one download stalled on a slow
  provider keeps a process alive that will never consume again;
- the status it computed is then lost: ``app.worker_main`` (what ``ingest worker`` calls)
  drops the value of ``app.start``, so the process ends with 0. A supervisor that restarts
  on failure does not restart it, and ``ingest worker``'s parent, which stops its siblings
  only when a child fails, keeps running one consumer short.

:class:`ExitOnFailure`, a worker bootstep (added to the app in tasks.celery_app), fixes both
when the worker stops with a failure status, and leaves every other stop alone (a SIGTERM
stops with status 0 and takes its own path):

- it gives the tasks in flight :data:`FAILED_WORKER_GRACE_SECONDS` to finish, then ends the
  process with ``os._exit``. A task cut short is not lost: its message is unacknowledged
  (``task_acks_late``), so the broker redelivers it, and its row's lease runs out for the
  reconciler;
- when the stop completes within the grace, it raises ``SystemExit`` with the status from the
  last ``worker_shutdown`` receiver, so every other receiver (the runtime's cleanup) has run
  and the interpreter exits the ordinary way.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.signals import worker_shutdown

log = logging.getLogger(__name__)

# How long the tasks in flight of a worker whose consumer died may still finish. Short: the
# process consumes nothing meanwhile, and whatever is cut short is redelivered.
FAILED_WORKER_GRACE_SECONDS = 10.0


class ExitOnFailure(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: a stop with a failure status ends the process, non-zero, in time."""

    label = "ExitOnFailure"

    def close(self, worker: Any) -> None:
        # Blueprint.stop calls every step's close() first, before any stop() (the pool's
        # stop is the one that waits for tasks in flight). WorkController.stop has already
        # recorded the status: 1 after "Unrecoverable error", 0 or None otherwise.
        status = worker.exitcode
        if status:
            arm_exit(int(status), FAILED_WORKER_GRACE_SECONDS)


def arm_exit(status: int, grace_seconds: float) -> None:
    """End this process with ``status``: at the end of the worker's stop, or after
    ``grace_seconds`` if the stop is still waiting then."""
    log.error(
        "worker: stopping after a failure; exiting with status %d once the tasks in flight "
        "end, or in %.0f s at the latest",
        status,
        grace_seconds,
    )
    watchdog = threading.Timer(grace_seconds, _exit_now, args=(status, grace_seconds))
    watchdog.name = "exit-on-failure"
    watchdog.daemon = True
    watchdog.start()

    # Connected now, so it is the last receiver: the others (tasks.media closes the runtime)
    # run first. Raised from WorkController.stop, SystemExit passes through Celery's and
    # click's handlers (they catch Exception and click's Exit) up to the interpreter. The
    # watchdog stays armed: should the interpreter's exit wait on a thread, it still ends it.
    def exit_with_status(**_: Any) -> None:
        raise SystemExit(status)

    worker_shutdown.connect(exit_with_status, weak=False)


# Called just before a failed worker exits with tasks still running (tasks.media registers
# the pipeline's hand-back): their rows go to other workers at once, not after a lease.
BEFORE_FORCED_EXIT: list[Callable[[], object]] = []


def _exit_now(status: int, grace_seconds: float) -> None:
    log.error(
        "worker: tasks still running %.0f s after the failure; exiting with status %d",
        grace_seconds,
        status,
    )
    for hand_back in BEFORE_FORCED_EXIT:
        try:
            hand_back()
        except Exception:  # the exit must happen whatever the hand-back meets
            log.exception("worker: could not hand back the tasks in flight")
    hard_exit(status)


def hard_exit(status: int) -> None:
    """End the process now, whatever its threads are doing (a worker past its bound)."""
    # os._exit skips buffered output: flush the log lines that say why first.
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
