"""The download attempts in flight in one worker process, and what each holds while it runs.

An attempt holds its row's lease and, during a provider call, a slot of the number's error
budget. :meth:`InFlight.keep_lease` is called per chunk of a transfer: once a third of the
lease has passed it renews the lease with an ``UPDATE`` guarded by the lease owner (a renewal
that matches no row means another worker owns the row: :class:`LeaseLost`), and it renews the
budget slot of the call in flight the same way, so a slow but live transfer keeps both.

The rows of one wake-up are claimed together and then run side by side on the process's
row slots, as many at once as it has: those not started yet are *queued* here
(:meth:`InFlight.queueing`), each with its lease running since the claim.
:meth:`InFlight.abandon_all` (a worker's bounded shutdown) stops every transfer at its next
chunk (:class:`Abandoned`) and hands its row, lease and budget slot back at once, and hands
the queued rows back with them, so another worker can take them.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ingest import media_rows
from ingest.error_budget import BudgetUnavailable, ErrorBudget, Reservation, in_flight_ttl
from ingest.models import MediaType
from ingest.providers import Credentials, MediaLocation, ProviderClient
from ingest.settings import Settings

# The pipeline's logger: these lines are part of an attempt's story, read and filtered with it.
log = logging.getLogger("ingest.pipeline")

# A lease renewal that meets a database outage is tried again this soon, not a third of a
# lease later: the lease still has two thirds to run.
RENEW_RETRY_SECONDS = 5.0
# The errors of a database that is down or restarting (not of a statement that is wrong).
DATABASE_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeout)

# A transfer renews its lease every lease_seconds / 3: a renewal that comes a whole stalled
# read (the HTTP timeout) late still finds the lease live, with a wide margin for clock skew.
LEASE_RENEWALS_PER_LEASE = 3


@dataclass(frozen=True)
class WorkItem:
    """The plain values one attempt needs, loaded at claim time (no ORM object, no session)."""

    id: int
    owner: str
    attempts: int
    # Leases of this row that ran out: an attempt that ended without a record (its worker died).
    lease_losses: int
    instance_id: int
    instance_name: str
    connected: bool
    credentials: Credentials = field(repr=False)
    message_id: str
    media_id: str | None
    media_type: MediaType
    animated: bool
    declared_mime: str | None
    declared_sha256: str | None
    declared_size: int | None
    received_at: datetime
    expires_at: datetime
    # The webhook's signed URL, only while fresh. Confidential: never logged.
    fresh_url: str | None = field(repr=False)
    had_url: bool
    # The instance had a callback URL at claim time: a terminal result is announced
    # (ingest.callbacks) in the transaction that records it. False costs no statement.
    announces: bool = False


@dataclass
class Attempt:
    """Mutable bookkeeping of one attempt."""

    work: WorkItem
    client: ProviderClient
    location: MediaLocation | None = None
    url_used: bool = False
    resolves: int = 0
    downloads: int = 0
    # time.monotonic() value after which the lease is renewed; never, unless set.
    renew_at: float = math.inf
    # The error-budget reservation of the provider call in flight, and when to renew it.
    reservation: Reservation | None = None
    reservation_renew_at: float = math.inf


class LeaseLost(Exception):
    """Another worker owns the row now: the attempt stops and writes nothing more."""


class Abandoned(Exception):
    """The worker is stopping: the attempt stops and its row is handed back."""


class InFlight:
    def __init__(
        self,
        *,
        settings: Settings,
        one_statement: Engine,
        budget: ErrorBudget,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._renew_every = settings.lease_seconds / LEASE_RENEWALS_PER_LEASE
        # A reservation lives for the call's own bound; renewing at a third of it keeps a
        # live transfer's slot however slowly the bytes come.
        self._renew_reservation_every = in_flight_ttl(settings) / 3
        self._one_statement = one_statement
        self.budget = budget
        self.clock = clock
        self.monotonic = monotonic
        # Attempts in flight in this process, for a bounded shutdown (abandon_all).
        self.stopping = threading.Event()
        self._active: dict[int, Attempt] = {}
        # Rows claimed and not started, with the time.monotonic() of their claim.
        self._queued: dict[int, tuple[WorkItem, float]] = {}
        self._active_lock = threading.Lock()

    @contextmanager
    def queueing(self, works: list[WorkItem]) -> Iterator[None]:
        """Rows just claimed together, known to :meth:`abandon_all` until each starts."""
        claimed_at = self.monotonic()
        with self._active_lock:
            for work in works:
                self._queued[work.id] = (work, claimed_at)
        try:
            yield
        finally:
            with self._active_lock:
                for work in works:
                    self._queued.pop(work.id, None)

    @contextmanager
    def tracking(self, work: WorkItem, client: ProviderClient) -> Iterator[Attempt]:
        """The attempt on a row claimed by this process, known to :meth:`abandon_all` while it
        runs. Raises :class:`Abandoned` at once when the worker is stopping: the row is the
        caller's to hand back, like one abandoned mid-transfer."""
        with self._active_lock:
            if self.stopping.is_set():
                raise Abandoned
            _, claimed_at = self._queued.pop(work.id, (work, self.monotonic()))
            # Its lease runs from the claim, not from the start of the attempt.
            attempt = Attempt(work, client, renew_at=claimed_at + self._renew_every)
            self._active[work.id] = attempt
        try:
            yield attempt
        finally:
            with self._active_lock:
                self._active.pop(work.id, None)

    @contextmanager
    def holding(self, attempt: Attempt, reservation: Reservation) -> Iterator[None]:
        """The provider call in flight holds ``reservation``: renewed by :meth:`keep_lease`,
        released by :meth:`abandon_all`."""
        attempt.reservation = reservation
        attempt.reservation_renew_at = self.monotonic() + self._renew_reservation_every
        try:
            yield
        finally:
            attempt.reservation = None

    def keep_lease(self, attempt: Attempt, when: str) -> None:
        """Renew the lease once a renewal is due; raise :class:`LeaseLost` if it is not ours.

        Called per chunk, so it costs one clock read and a flag until the first renewal is
        due: a transfer shorter than the interval never renews. Also renews the budget
        reservation of the call in flight, and stops the transfer when the worker is stopping.
        """
        if self.stopping.is_set():
            raise Abandoned
        now_monotonic = self.monotonic()
        if attempt.reservation is not None and now_monotonic >= attempt.reservation_renew_at:
            try:
                self.budget.renew(attempt.reservation)
            except BudgetUnavailable as exc:
                log.warning(
                    "download item=%s could not renew its budget slot (%s)", attempt.work.id, exc
                )
            attempt.reservation_renew_at = now_monotonic + self._renew_reservation_every
        if now_monotonic < attempt.renew_at:
            return
        work = attempt.work
        now = self.clock()
        try:
            with self._one_statement.begin() as connection:
                renewed = media_rows.renew_lease(
                    connection,
                    work.id,
                    work.owner,
                    now=now,
                    lease_until=now + timedelta(seconds=self.settings.lease_seconds),
                )
        except DATABASE_UNREACHABLE as exc:
            log.warning(
                "download item=%s could not renew its lease (%s)", work.id, type(exc).__name__
            )
            attempt.renew_at = now_monotonic + RENEW_RETRY_SECONDS
            return
        if not renewed:
            raise LeaseLost(f"lost its lease {when}")
        attempt.renew_at = self.monotonic() + self._renew_every

    def abandon_all(self) -> int:
        """Stop every attempt in flight in this process and hand its row back: lease
        cleared, due now, budget slot released. Returns how many were handed back.

        Called once when a worker's shutdown bound is reached. Transfers stop at their next
        chunk; one blocked in a read is handed back from here, and its thread, once it
        wakes, finds the row no longer its own and writes nothing.
        """
        self.stopping.set()
        with self._active_lock:
            attempts = list(self._active.values())
            queued = [work for work, _ in self._queued.values()]
            self._queued.clear()
        for attempt in attempts:
            if attempt.reservation is not None:
                try:
                    self.budget.release(attempt.reservation)
                except BudgetUnavailable as exc:
                    log.warning("shutdown: could not release a budget slot (%s)", exc)
        self.hand_back([attempt.work for attempt in attempts] + queued)
        return len(attempts) + len(queued)

    def hand_back(self, works: list[WorkItem]) -> None:
        """Give the rows back as they were before their claim (those still held)."""
        by_owner: dict[str, list[int]] = {}
        for work in works:
            by_owner.setdefault(work.owner, []).append(work.id)
        now = self.clock()
        with self._one_statement.begin() as connection:
            for owner, item_ids in by_owner.items():
                media_rows.hand_back(connection, item_ids, owner, now)
