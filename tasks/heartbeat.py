"""A worker's liveness signal: a file touched every few seconds while its consumer works.

Readiness and liveness are different questions. A web process is ready when it can reach its
database; a worker is *alive* when its consumer is running, i.e. it would take a task if one
came. A process whose consumer died but which did not exit consumes nothing, and nothing
else would notice: `ingest worker-alive` (a Kubernetes exec probe, a systemd watchdog
script) reads the file's age instead.

Two parts:

- :class:`ConsumerTicks`, a consumer bootstep, records a tick from the consumer's own timer
  (driven by its event loop): ticks stop when the loop stops;
- :class:`HeartbeatWriter`, a daemon thread, touches the file while the consumer is
  *running* with recent ticks, or *reconnecting* to a broker that went away (that is riding
  out an outage, not dead: restarting the process would not bring the broker back). It stops
  touching once the worker is shutting down or the consumer was shut down for good.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

log = logging.getLogger(__name__)

TICK_SECONDS = 2.0
# Ticks older than this mean the consumer's loop is stuck.
STALE_TICKS_SECONDS = 15.0


class _ConsumerState:
    def __init__(self) -> None:
        self.phase = "starting"  # starting, running, reconnecting, shut down
        self.last_tick = time.monotonic()

    def alive(self) -> bool:
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            return False
        if self.phase == "reconnecting":
            return True
        if self.phase == "running":
            return time.monotonic() - self.last_tick < STALE_TICKS_SECONDS
        return False


CONSUMER = _ConsumerState()


class ConsumerTicks(bootsteps.StartStopStep):  # type: ignore[misc]
    """Ticks from the consumer's timer; started after the consumer can take tasks."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer_entry: Any = None

    def start(self, parent: Any) -> None:
        CONSUMER.phase = "running"
        CONSUMER.last_tick = time.monotonic()
        self._timer_entry = parent.timer.call_repeatedly(TICK_SECONDS, _tick, priority=10)

    def stop(self, parent: Any) -> None:
        # A consumer restarts its steps after losing the broker: stopped, then started again.
        self._cancel()
        CONSUMER.phase = "reconnecting"

    def shutdown(self, parent: Any) -> None:
        self._cancel()
        CONSUMER.phase = "shut down"

    def _cancel(self) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None


def _tick() -> None:
    CONSUMER.last_tick = time.monotonic()


class HeartbeatWriter:
    """Touches ``path`` every :data:`TICK_SECONDS` while the consumer is alive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            if CONSUMER.alive():
                touch(self.path)


def touch(path: Path) -> None:
    try:
        path.touch()
        os.utime(path)
    except OSError as exc:  # a full or read-only disk must not stop the worker
        log.warning("heartbeat: cannot touch %s (%s)", path, exc.strerror)


def heartbeat_age(path: Path) -> float | None:
    """Seconds since ``path`` was last touched; None if it does not exist."""
    try:
        return max(time.time() - path.stat().st_mtime, 0.0)
    except FileNotFoundError:
        return None
