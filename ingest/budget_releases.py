"""Error-budget releases taken off the download's path and sent together.

Nearly every provider call ends well, and then releases its reservation in the error budget
(:mod:`ingest.error_budget`): a Redis round trip on the download thread, between the transfer
and the upload. Under live traffic that was about 7 % of a download thread's time, and the
threads were what the worker ran out of (docs/THROUGHPUT.md). Nothing the attempt does next
depends on the release: a slot that stays taken a few milliseconds longer only makes the
budget more cautious. So the attempt hands the release to its process's
:class:`BackgroundReleases` and goes on; that thread sends every release waiting in one
round trip (:meth:`~ingest.error_budget.RedisErrorBudget.release_many`).

Bounds, the same as an unreleased slot always had: a release the store refuses is logged,
and a process that dies with releases waiting leaves them to the in-flight bound (the HTTP
timeout at most), after which the slots stop counting by themselves. :meth:`close` sends what
is waiting. Reservations, confirmations (an error response, which must count before the next
reservation) and renewals stay on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ingest.error_budget import BatchReleasing, BudgetLimit, BudgetUnavailable, Reservation

log = logging.getLogger(__name__)

# How long close() waits for the thread to send what it holds before sending the rest itself.
CLOSE_WAIT_SECONDS = 2.0


class BackgroundReleases:
    """An error budget whose releases a thread of their own sends, several at a time."""

    def __init__(self, budget: BatchReleasing) -> None:
        self.budget = budget
        self._waiting: list[Reservation] = []
        self._changed = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def reserve(self, limits: Sequence[BudgetLimit]) -> Reservation:
        return self.budget.reserve(limits)

    def confirm(self, reservation: Reservation) -> None:
        self.budget.confirm(reservation)

    def renew(self, reservation: Reservation) -> None:
        self.budget.renew(reservation)

    def release(self, reservation: Reservation) -> None:
        """Queue the release and return at once; never raises for the store."""
        with self._changed:
            if not self._closing:
                self._waiting.append(reservation)
                if self._thread is None:
                    # Started on first use, in the process that uses it (after any fork).
                    self._thread = threading.Thread(
                        target=self._loop, name="budget-releases", daemon=True
                    )
                    self._thread.start()
                self._changed.notify()
                return
        self._send([reservation])

    def close(self) -> None:
        """Send every release still waiting; later releases are sent on the caller's thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
            thread = self._thread
        if thread is not None:
            thread.join(CLOSE_WAIT_SECONDS)
        with self._changed:
            left, self._waiting = self._waiting, []
        self._send(left)

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closing:
                    self._changed.wait()
                taken, self._waiting = self._waiting, []
                if not taken:
                    return  # closing, and nothing left
            self._send(taken)

    def _send(self, reservations: list[Reservation]) -> None:
        if not reservations:
            return
        try:
            self.budget.release_many(reservations)
        except BudgetUnavailable as exc:
            # As on the caller's thread before: the slots free after the in-flight bound.
            log.warning(
                "error budget: could not release %d reservation(s) (%s)", len(reservations), exc
            )
        except Exception:  # the thread must outlive a bug in one batch
            log.exception("error budget: releasing %d reservation(s) failed", len(reservations))
