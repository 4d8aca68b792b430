"""One download attempt: claim -> locate -> download -> verify -> store -> mark.

:meth:`Pipeline.run` takes a row id and is safe to call any number of times, from any number
of threads or processes: it first claims the row with one conditional ``UPDATE`` (only a row
that is due and holds no live lease can be claimed), loads plain values and closes the
session before any network I/O, and finishes with an ``UPDATE`` guarded by its lease, so a
worker that lost its lease never overwrites a newer attempt. A transfer that outlasts a third
of the lease renews it as it goes; if the row turns out to belong to another worker by then,
the attempt stops at once, writes nothing and ends ``skipped`` (reason ``lease_lost``). The
row's writes are transitions of :mod:`ingest.media_rows`; this module decides which one ends
an attempt, and when.

The steps live beside it: :mod:`ingest.media_fetch` locates, downloads and verifies the bytes
(the URL rule, the error budget around every provider call); :mod:`ingest.in_flight` keeps
the lease and budget slot of each attempt in flight; :mod:`ingest.storage_breaker` guards the
upload; :mod:`ingest.finishing_writes` records the result, through a database outage;
:mod:`ingest.attempt_errors` turns failures into outcomes of the retry table.

Faults end an attempt cleanly rather than repeating work: after ``storage_breaker_failures``
consecutive object-store failures the pipeline stops claiming (rows are deferred, no provider
call is spent on bytes that could not be kept) and probes the store every
``storage_breaker_reset_seconds`` until it answers; :meth:`Pipeline.abandon_all` (a worker's
bounded shutdown) stops every transfer in flight and hands its row, lease and budget slot back
at once, so another worker can take it.

Nothing unverified is ever stored: only bytes whose sha256, size and MIME type were checked
are put into storage, which checks the sha256 once more while writing.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from ingest import media_rows, metrics
from ingest.attempt_errors import AttemptFailed
from ingest.db import DATABASE_DOWN, one_statement_engine
from ingest.error_budget import ErrorBudget, budget_for
from ingest.finishing_writes import FinishingWrites
from ingest.in_flight import Abandoned, Attempt, InFlight, LeaseLost, WorkItem
from ingest.intake import URL_LIFETIME
from ingest.integrity import Expectation, checksum_problem
from ingest.media_fetch import MediaFetch, Verified
from ingest.media_rules import object_key
from ingest.models import MediaState, MediaType, Provider, utcnow
from ingest.providers import Credentials, ProviderClient
from ingest.removal import delete_if_removed
from ingest.retry_policy import Decision, Outcome, decide
from ingest.secrets import SecretBox, SecretKeyError, secret_box
from ingest.services import Services
from ingest.settings import Settings
from ingest.storage import Storage, StorageError, StoredObject
from ingest.storage_breaker import StorageBreaker

log = logging.getLogger(__name__)

ClientFactory = Callable[[Credentials], ProviderClient]
Clock = Callable[[], datetime]
SKIPPED = "skipped"
# Why an attempt that had claimed its row ended as skipped: another worker owns the row now.
LEASE_LOST = "lease_lost"
# Why an attempt ended as skipped: the worker is stopping and handed the row back.
ABANDONED = "abandoned"
# Why a due row was not claimed: the object store is failing, so nothing is downloaded.
STORAGE_PAUSED = "storage_paused"
# A message's rows run side by side on the process's row slots, and the copies they store are
# recorded together (one round trip, docs/THROUGHPUT.md) when the message is done, or once
# the oldest has waited this long while others still run (large media go one to a message).
# A worker that dies meanwhile loses no bytes: the next attempt finds each copy in storage
# and records it without downloading; a stopping worker records them in abandon_all.
RECORD_WITHIN_SECONDS = 1.0


@dataclass(frozen=True)
class AttemptResult:
    """What one call of :meth:`Pipeline.run` did; safe to log (no URL, no secret)."""

    item_id: int
    # An Outcome value, or "skipped" when the row could not be claimed or was lost mid-attempt
    outcome: str
    state: str | None  # the row's state afterwards (None when skipped)
    reason: str | None = None  # failure_reason for failed rows; "lease_lost" for a lost lease
    size: int | None = None
    seconds: float = 0.0
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class _Unrecorded:
    """A verified copy in storage whose row is not yet marked stored."""

    work: WorkItem
    stored: StoredObject
    started: float  # time.monotonic() when the attempt started
    ready: float  # time.monotonic() when the copy was in place


def _copy_result(copy: _Unrecorded, recorded: bool) -> AttemptResult:
    """How an attempt whose copy was in storage ended: stored, or its lease lost first."""
    work = copy.work
    if recorded:
        result = AttemptResult(work.id, Outcome.STORED, MediaState.STORED, size=copy.stored.size)
    else:
        result = AttemptResult(work.id, SKIPPED, None, LEASE_LOST)
    return replace(result, seconds=time.monotonic() - copy.started)


def _key_of(work: WorkItem) -> str:
    return object_key(work.instance_name, work.media_type.value, work.media_id or work.message_id)


def new_lease_owner() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Pipeline:
    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        storage: Storage,
        budget: ErrorBudget,
        clients: ClientFactory,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        row_slots: int | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self._one_statement = one_statement_engine(sessions)
        self.storage = storage
        self.budget = budget
        self.clients = clients
        self.clock = clock
        self.rng = rng or random.Random()
        self.storage_breaker = StorageBreaker(settings)
        self.in_flight = InFlight(
            settings=settings,
            one_statement=self._one_statement,
            budget=budget,
            clock=clock,
            monotonic=monotonic,
        )
        self.media_fetch = MediaFetch(settings, budget, self.in_flight, clock)
        self.finishing = FinishingWrites(sessions, self._one_statement)
        # Copies in storage whose rows wait for their message's batched record, by row id:
        # whoever takes one out of here (the message's thread, or abandon_all at shutdown)
        # records it, and nobody else does.
        self._awaiting_record: dict[int, _Unrecorded] = {}
        self._awaiting_lock = threading.Lock()
        # Every attempt of this process runs on one of these threads, whichever message
        # brought its row: the message's own thread only claims, waits and records, so a
        # message's rows run side by side and the process never runs more than this many at
        # once, however its messages are shaped (docs/ARCHITECTURE.md, Durability).
        self._row_slots = ThreadPoolExecutor(
            max_workers=row_slots or settings.rows_side_by_side,
            thread_name_prefix="ingest-row",
        )

    def close(self) -> None:
        """Let the row slots' threads end once their attempts have. Rows not started yet
        still start, and a stopping worker's find it stopping and are handed back: cancelled,
        they would be nobody's until their lease ran out."""
        self._row_slots.shutdown(wait=False)

    @classmethod
    def for_services(
        cls, services: Services, clients: ClientFactory, *, budget: ErrorBudget | None = None
    ) -> Pipeline:
        """The pipeline of one process: its SQL, storage and (Redis or SQL) error budget."""
        return cls(
            settings=services.settings,
            sessions=services.sessions,
            storage=services.storage,
            budget=budget or budget_for(services.settings, services.sessions, services.redis),
            clients=clients,
        )

    # --- the attempt ---------------------------------------------------------------------

    def run(self, item_id: int) -> AttemptResult:
        return self.run_many([item_id])[0]

    def run_many(
        self,
        item_ids: Sequence[int],
        row_context: Callable[[int], AbstractContextManager[object]] = nullcontext,
    ) -> list[AttemptResult]:
        """The rows of one wake-up: claimed together in one statement, then tried side by
        side on the process's row slots (``row_context`` wraps each, for its log lines),
        their copies recorded together (:data:`RECORD_WITHIN_SECONDS`). A stopping worker
        hands the rows not started yet back (:meth:`InFlight.abandon_all`).

        A row whose attempt raised does not stop the others: they run and are recorded, and
        the first such error is raised after them."""
        if self.in_flight.stopping.is_set():
            # The message is acknowledged unrun; the rows are still pending and due, and the
            # reconciler wakes them for another worker.
            return [AttemptResult(item_id, SKIPPED, None, ABANDONED) for item_id in item_ids]
        if not self.storage_available():
            return [self._defer_unclaimed(item_id) for item_id in item_ids]
        item_ids = list(dict.fromkeys(item_ids))  # a row named twice is tried once
        claimed = {work.id: work for work in self.claim_many(item_ids)}
        results: dict[int, AttemptResult] = {}
        for item_id in item_ids:
            if item_id not in claimed:
                with row_context(item_id):
                    metrics.DOWNLOADS.labels(SKIPPED, "").inc()
                    log.info(
                        "download item=%s outcome=skipped (not due, leased or finished)", item_id
                    )
                results[item_id] = AttemptResult(item_id, SKIPPED, None)
        if claimed:
            with self.in_flight.queueing(list(claimed.values())):
                # In the message's order: a process whose slots are all busy starts them so.
                # Each in a copy of the message's context, so its log fields follow it.
                running = {
                    self._row_slots.submit(
                        contextvars.copy_context().run,
                        self._run_in_slot,
                        claimed[item_id],
                        row_context,
                    )
                    for item_id in item_ids
                    if item_id in claimed
                }
                results.update(self._collect(running, row_context))
        return [results[item_id] for item_id in item_ids]

    def _run_in_slot(
        self, work: WorkItem, row_context: Callable[[int], AbstractContextManager[object]]
    ) -> AttemptResult | _Unrecorded:
        with row_context(work.id):
            ran = self._run_claimed(work)
        if isinstance(ran, _Unrecorded):
            # Known to abandon_all from the moment the copy is in place.
            with self._awaiting_lock:
                self._awaiting_record[work.id] = ran
        return ran

    def _collect(
        self,
        running: set[Future[AttemptResult | _Unrecorded]],
        row_context: Callable[[int], AbstractContextManager[object]],
    ) -> dict[int, AttemptResult]:
        """Wait for the message's rows; record their copies together when all have ended, or
        as soon as the oldest copy has waited :data:`RECORD_WITHIN_SECONDS`.

        Returns only once every row has ended, also when one raised or a record failed (the
        first error is raised then): a row left running would be nobody's to record."""
        results: dict[int, AttemptResult] = {}
        unrecorded: list[_Unrecorded] = []
        failure: BaseException | None = None

        def record_due_now() -> None:
            nonlocal unrecorded, failure
            batch, unrecorded = unrecorded, []
            try:
                results.update(self._record_copies(batch, row_context))
            except Exception as exc:  # noqa: BLE001 - raised once the other rows have ended
                # A database outage past the finishing write's patience: these copies wait
                # in storage for their rows' next attempt (found there, not downloaded again).
                failure = failure or exc

        oldest: float | None = None  # when the oldest copy waiting to be recorded was ready
        while running:
            timeout = None
            if oldest is not None:
                timeout = max(0.0, oldest + RECORD_WITHIN_SECONDS - time.monotonic())
            done, running = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                error = future.exception()
                if error is not None:  # raised once the other rows have ended
                    failure = failure or error
                    continue
                ran = future.result()
                if isinstance(ran, _Unrecorded):
                    unrecorded.append(ran)
                else:
                    results[ran.item_id] = ran
            oldest = min((copy.ready for copy in unrecorded), default=None)
            due = oldest is not None and time.monotonic() - oldest >= RECORD_WITHIN_SECONDS
            if running and due:
                record_due_now()
                oldest = None
        if unrecorded:
            record_due_now()
        if failure is not None:
            raise failure
        return results

    def _run_claimed(self, work: WorkItem) -> AttemptResult | _Unrecorded:
        """The attempt's result, recorded and counted; or its copy, for the caller to record
        with the others of its message."""
        started = time.monotonic()
        try:
            with self.in_flight.tracking(work, self.clients(work.credentials)) as attempt:
                ended = self._attempt(attempt)
        except Abandoned:
            # Stopped mid-transfer, or before it started. abandon_all may have handed the row
            # back already; a second hand-back matches nothing.
            try:
                self.in_flight.hand_back([work])
            except DATABASE_DOWN as exc:
                # The process is stopping: the row's lease hands it on instead.
                log.warning(
                    "download item=%s could not be handed back (%s)", work.id, type(exc).__name__
                )
            ended = AttemptResult(work.id, SKIPPED, None, ABANDONED)
        if isinstance(ended, StoredObject):
            return _Unrecorded(work, ended, started, ready=time.monotonic())
        result = replace(ended, seconds=time.monotonic() - started)
        self._record(work, result)
        return result

    def _attempt(self, attempt: Attempt) -> AttemptResult | StoredObject:
        """How the attempt ended, or the verified copy it has in storage to be recorded."""
        work = attempt.work
        try:
            earlier = self._copy_of_an_earlier_attempt(work)
            if earlier is not None:
                return earlier
            verified = self.media_fetch.fetch(attempt)
            try:
                return self._store(attempt, verified)
            finally:
                verified.spool.close()
        except AttemptFailed as failure:
            return self._finish_unstored(attempt, failure)
        except LeaseLost as lost:
            # The row is the new owner's to finish: recording anything here would overwrite
            # its attempt, and counting this one as stored or retried would count it twice.
            log.warning("download item=%s %s", work.id, lost)
            return AttemptResult(work.id, SKIPPED, None, LEASE_LOST)

    # --- faults: the object store, a stopping worker -------------------------------------

    def storage_available(self) -> bool:
        """False while the storage breaker is open (:mod:`ingest.storage_breaker`)."""
        return self.storage_breaker.available(self.storage)

    def _defer_unclaimed(self, item_id: int) -> AttemptResult:
        now = self.clock()
        pause = self.settings.storage_breaker_reset_seconds
        next_attempt_at = now + timedelta(seconds=pause + self.rng.uniform(0, pause))
        with self._one_statement.begin() as connection:
            media_rows.defer_unclaimed(
                connection, item_id, now=now, next_attempt_at=next_attempt_at
            )
        metrics.DOWNLOADS.labels(SKIPPED, STORAGE_PAUSED).inc()
        log.info("download item=%s outcome=skipped reason=%s", item_id, STORAGE_PAUSED)
        return AttemptResult(
            item_id, SKIPPED, None, STORAGE_PAUSED, next_attempt_at=next_attempt_at
        )

    def abandon_all(self) -> int:
        """Stop every attempt in flight in this process and hand its row, lease and budget
        slot back (:meth:`InFlight.abandon_all`). Returns how many were handed back.

        Copies already in storage and waiting for their message's record are recorded first,
        with one try (no waiting out a database outage: the process is about to exit, and
        the next attempt finds such a copy in storage anyway)."""
        with self._awaiting_lock:
            waiting, self._awaiting_record = list(self._awaiting_record.values()), {}
        for copy in waiting:
            try:
                recorded = self.finishing.record_now(copy.work, copy.stored, self.clock())
            except DATABASE_DOWN as exc:
                log.warning(
                    "shutdown: could not record %d stored copies (%s); the next attempts "
                    "will find them in storage",
                    len(waiting),
                    type(exc).__name__,
                )
                break
            self._record(copy.work, _copy_result(copy, recorded))
        return self.in_flight.abandon_all()

    def claim(self, item_id: int) -> WorkItem | None:
        """Take the row with a lease, or return None if it is not ours to work on now."""
        claimed = self.claim_many([item_id])
        return claimed[0] if claimed else None

    def claim_many(self, item_ids: Sequence[int]) -> list[WorkItem]:
        """Take the rows that are ours to work on now, with a lease, in one statement.

        A row stuck in ``downloading`` whose lease ran out ``max_lease_losses`` times is left
        for the reconciler to fail as ``worker_lost`` rather than crash another worker.
        """
        now = self.clock()
        owner = new_lease_owner()
        # Before claiming: without a usable key (INGEST_SECRET_KEY unset on a server
        # database) no row is claimed only to fail; the rows stay due for a fixed worker.
        box = secret_box(self.settings)
        # Core execution of statements built once: the ORM's bulk-update path and a fresh
        # cache key per call were a large share of the worker's CPU per item.
        with self._one_statement.begin() as connection:
            claimed = media_rows.claim(
                connection,
                item_ids,
                owner=owner,
                now=now,
                lease_until=now + timedelta(seconds=self.settings.lease_seconds),
                max_lease_losses=self.settings.max_lease_losses,
            )
        try:
            return [self._work_item(item, instance, owner, box, now) for item, instance in claimed]
        except SecretKeyError:
            # Encrypted with a key this process lacks: no fault of the rows'. Hand them back
            # as they were (attempt given back) for when the keys are fixed, and say so loudly.
            with self._one_statement.begin() as connection:
                media_rows.hand_back(connection, [item.id for item, _ in claimed], owner, now)
            raise

    def _work_item(
        self, item: Any, instance: Any, owner: str, box: SecretBox, now: datetime
    ) -> WorkItem:
        api_key = box.decrypt(instance.instance_api_key_encrypted)
        # The URL's five minutes started when it was issued (ingest.intake.issued_at: the
        # receipt, or the message's time for a late redelivery), which its deadline records.
        issued = item.received_at if item.url_deadline is None else item.url_deadline - URL_LIFETIME
        fresh = item.download_url is not None and now - issued < timedelta(
            seconds=self.settings.url_fresh_seconds
        )
        return WorkItem(
            id=item.id,
            owner=owner,
            attempts=item.attempts,
            lease_losses=item.lease_losses,
            instance_id=item.instance_id,
            instance_name=instance.instance_name,
            connected=instance.instance_connected,
            credentials=Credentials(
                provider=Provider(instance.instance_provider),
                phone_number_id=instance.instance_phone_number_id,
                api_key=api_key,
            ),
            message_id=item.message_id,
            media_id=item.media_id,
            media_type=MediaType(item.media_type),
            animated=item.animated,
            declared_mime=item.declared_mime,
            declared_sha256=item.declared_sha256,
            declared_size=item.declared_size,
            received_at=item.received_at,
            expires_at=item.expires_at,
            fresh_url=item.download_url if fresh else None,
            had_url=item.download_url is not None,
            announces=bool(instance.instance_announces),
        )

    # --- finish --------------------------------------------------------------------------

    def _copy_of_an_earlier_attempt(self, work: WorkItem) -> StoredObject | None:
        """The verified copy an earlier attempt of this row left in storage, if any.

        An attempt that uploaded its copy and then died before recording it (a killed worker,
        a database outage longer than the finishing write waits) leaves the row to be claimed
        again once its lease lapses. Its object is in place under the row's deterministic key,
        and it was checked while written (the sha256 before the put, the store's own check
        during it): recording it costs one HEAD instead of a download, a provider call and
        a budget slot, and it still works when the media id has expired or the instance is
        disconnected meanwhile.

        Only a row that has lost a lease looks (an attempt that ended without any record), or
        one that could not download anyway (the media id expired, the instance disconnected).
        Every other attempt before it ended with a record, so nothing can be waiting: the
        common path, first attempts and ordinary retries alike, pays no HEAD, and a retry
        while the store is down does not wait on one.
        """
        if not work.lease_losses and work.connected and self.clock() < work.expires_at:
            return None
        key = _key_of(work)
        try:
            found = self.storage.head(key)
        except FileNotFoundError:
            return None
        except StorageError as exc:
            # Unknown is not absent, but a download is still correct: its put meets the same
            # object (or the same failing store) and reports it.
            log.warning("download item=%s: could not look for an earlier copy (%s)", work.id, exc)
            return None
        # An object this service did not write carries no sha256 of ours: never trusted.
        stated = Expectation("webhook", work.declared_sha256, work.declared_size)
        if not found.sha256 or checksum_problem(found.size, found.sha256, [stated]):
            return None
        log.info(
            "download item=%s: the copy an earlier attempt stored is in place; recording it "
            "without downloading again",
            work.id,
        )
        metrics.EARLIER_COPIES_FOUND.inc()
        return found

    def _store(self, attempt: Attempt, verified: Verified) -> StoredObject:
        work = attempt.work
        spool = verified.spool
        key = _key_of(work)
        # Renewing here if due means a lost lease writes nothing and the upload starts with at
        # least two thirds of a lease left. The upload itself is not renewed: one that outlasts
        # even that is wasted work, not wrong. Keys are deterministic and objects never
        # overwritten, so the next owner's put finds the same verified bytes, and the guarded
        # record below reports the loss instead of recording the copy.
        self.in_flight.keep_lease(attempt, "before uploading; nothing was stored")
        stored = self.storage_breaker.put(
            self.storage,
            key,
            spool.reader(),
            size=spool.size,
            sha256=spool.sha256,
            content_type=verified.mime,
        )
        return stored

    def _record_copies(
        self,
        copies: Sequence[_Unrecorded],
        row_context: Callable[[int], AbstractContextManager[object]],
    ) -> dict[int, AttemptResult]:
        """Mark the rows of these copies stored, together; each row's result, counted. A copy
        that abandon_all took meanwhile is its to record and count."""
        with self._awaiting_lock:
            mine = [c for c in copies if self._awaiting_record.pop(c.work.id, None) is not None]
        recorded = (
            self.finishing.stored_many([(c.work, c.stored) for c in mine], self.clock())
            if mine
            else set()
        )
        mine_ids = {c.work.id for c in mine}
        results = {}
        for copy in copies:
            work = copy.work
            if work.id not in mine_ids:
                # Recorded (and counted) by abandon_all, the worker stopping meanwhile.
                results[work.id] = AttemptResult(work.id, SKIPPED, None, ABANDONED)
                continue
            with row_context(work.id):
                if work.id not in recorded:
                    self._lost_before_recording(work, copy.stored)
                result = _copy_result(copy, work.id in recorded)
                self._record(work, result)
            results[work.id] = result
        return results

    def _lost_before_recording(self, work: WorkItem, stored: StoredObject) -> None:
        # The row is the new owner's to finish: recording anything here would overwrite its
        # attempt, and counting this one as stored would count it twice. The object is in
        # place under its deterministic key; whoever holds the lease now will find it there
        # and record it. Unless the row was erased or purged meanwhile: then nobody will, and
        # the copy must not outlive the request.
        log.warning("download item=%s lost its lease before recording the copy", work.id)
        try:
            delete_if_removed(self.sessions, self.storage, work.id, stored.key)
        except (StorageError, *DATABASE_DOWN) as exc:
            log.error(
                "download item=%s: could not check or delete a copy uploaded while the "
                "row was removed (%s); erase it again",
                work.id,
                type(exc).__name__,
            )

    def _finish_unstored(self, attempt: Attempt, failure: AttemptFailed) -> AttemptResult:
        work = attempt.work
        now = self.clock()
        decision: Decision = decide(
            failure.outcome,
            attempts=work.attempts,
            now=now,
            expires_at=work.expires_at,
            settings=self.settings,
            rng=self.rng,
            retry_after=failure.retry_after,
            not_before=failure.not_before,
        )
        self.finishing.not_stored(attempt, decision, failure, now)
        return AttemptResult(
            work.id,
            decision.outcome,
            decision.state,
            decision.failure_reason,
            next_attempt_at=decision.next_attempt_at,
        )

    def _record(self, work: WorkItem, result: AttemptResult) -> None:
        if result.state is None:
            metrics.DOWNLOADS.labels(SKIPPED, result.reason or "").inc()
        else:
            label = {
                MediaState.STORED: "stored",
                MediaState.PENDING: "retry",
                MediaState.FAILED: "failed",
                MediaState.EXPIRED: "expired",
            }.get(MediaState(result.state), "retry")
            metrics.DOWNLOADS.labels(label, result.outcome).inc()
        metrics.DOWNLOAD_SECONDS.observe(result.seconds)
        if result.state == MediaState.STORED:
            metrics.DOWNLOAD_BYTES.inc(result.size or 0)
            metrics.RECEIPT_TO_STORED_SECONDS.observe(
                max((self.clock() - work.received_at).total_seconds(), 0.0)
            )
        log.info(
            "download item=%s instance=%s outcome=%s state=%s reason=%s size=%s duration=%.3fs",
            work.id,
            work.instance_name,
            result.outcome,
            result.state,
            result.reason or "-",
            result.size if result.size is not None else "-",
            result.seconds,
        )
