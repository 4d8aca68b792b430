"""A pass run about once per interval from a daemon thread of a worker process.

(:class:`BackgroundThread` is the thread itself, which the wake-up relay shares.)

What the reconciler and the callback sender share: their own thread means a pass never waits
behind downloads (all download threads blocked on a stalled store, say); a random first delay
spreads processes started together over the interval, and a little jitter keeps them apart;
any error is logged and the next interval tries again, since these loops are the parts that
must outlive every other failure.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundThread:
    """A daemon thread of a worker process that runs :meth:`_loop` until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        raise NotImplementedError


class PeriodicThread(BackgroundThread):
    def __init__(self, name: str, run_pass: Callable[[], object], interval_seconds: float) -> None:
        super().__init__(name)
        self._run_pass = run_pass
        self._interval = interval_seconds

    def _loop(self) -> None:
        delay = random.uniform(0, self._interval)
        while not self.stopping.wait(delay):
            try:
                self._run_pass()
            except Exception:  # logged; the next interval tries again
                log.exception("%s pass failed; trying again in %.0f s", self.name, self._interval)
            delay = self._interval * random.uniform(0.9, 1.1)
