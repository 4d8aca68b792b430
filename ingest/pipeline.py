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

The URL rule: the signed URL from the webhook is used while it is fresh (issued less than
``settings.url_fresh_seconds`` ago: at its receipt, or earlier for a late redelivery);
otherwise, or when the CDN refuses it, the media id is resolved for a new one. Every provider
call is guarded by the number's error budget.

Faults end an attempt cleanly rather than repeating work: after ``storage_breaker_failures``
consecutive object-store failures the pipeline stops claiming (rows are deferred, no provider
call is spent on bytes that could not be kept) and probes the store every
``storage_breaker_reset_seconds`` until it answers; :meth:`Pipeline.abandon_all` (a worker's
bounded shutdown) stops every transfer in flight and hands its row, lease and budget slot back
at once, so another worker can take it.

Nothing unverified is ever stored: the body is spooled while hashed (small in memory, large
on disk, capped at 100 MB and at any stated size), compared with the webhook's and the
lookup's sha256 and size (a mismatch is retried once with a fresh URL), its first bytes are
checked against the declared MIME type, and only then is it put into storage, which checks
the sha256 once more while writing.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TypeVar

import pybreaker
import tenacity
from sqlalchemy import update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from ingest import callbacks, media_rows, metrics
from ingest.db import DATABASE_DOWN, one_statement_engine, session_scope
from ingest.error_budget import (
    BudgetExhausted,
    BudgetUnavailable,
    ErrorBudget,
    Reservation,
    budget_for,
    guarded,
    in_flight_ttl,
    limits_for,
)
from ingest.intake import URL_LIFETIME
from ingest.integrity import (
    BodyTooLarge,
    Expectation,
    HashingSpool,
    check_mime,
    checksum_problem,
)
from ingest.media_rules import object_key, over_send_limit
from ingest.models import Instance, MediaState, MediaType, Provider, utcnow
from ingest.providers import (
    Credentials,
    DisallowedHost,
    MediaLocation,
    MediaNotFound,
    ProviderAuthError,
    ProviderClient,
    ProviderError,
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    TooLarge,
    UrlRejected,
)
from ingest.removal import delete_if_removed
from ingest.retry_policy import Decision, Outcome, decide
from ingest.secrets import SecretKeyError, secret_box
from ingest.services import Services
from ingest.settings import Settings
from ingest.storage import InvalidKeyError, Storage, StorageError, StorageIntegrityError

log = logging.getLogger(__name__)

ClientFactory = Callable[[Credentials], ProviderClient]
_T = TypeVar("_T")
Clock = Callable[[], datetime]

# last_error is for operators: short, and never a URL or a secret.
MAX_ERROR_CHARS = 300
SKIPPED = "skipped"
# Why an attempt that had claimed its row ended as skipped: another worker owns the row now.
LEASE_LOST = "lease_lost"
# Why an attempt ended as skipped: the worker is stopping and handed the row back.
ABANDONED = "abandoned"
# Why a due row was not claimed: the object store is failing, so nothing is downloaded.
STORAGE_PAUSED = "storage_paused"
# The database went away while an attempt was finishing: its result (a verified copy in
# storage, a retry decision) is written once the database is back, within this long, rather
# than left for the lease to lapse (15 minutes by default). Past it the lease takes over.
FINISH_RETRY_SECONDS = 120.0
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


class AttemptFailed(Exception):
    """Ends an attempt with an outcome of the retry table. ``detail`` is safe to store."""

    def __init__(
        self,
        outcome: Outcome,
        detail: str,
        *,
        retry_after: float | None = None,
        not_before: datetime | None = None,
    ) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after
        self.not_before = not_before


class LeaseLost(Exception):
    """Another worker owns the row now: the attempt stops and writes nothing more."""


class Abandoned(Exception):
    """The worker is stopping: the attempt stops and its row is handed back."""


@dataclass
class _Verified:
    spool: HashingSpool
    mime: str


@dataclass
class _Attempt:
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
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self._one_statement = one_statement_engine(sessions)
        # For the few finishing writes that are two statements (the record and its callback
        # event): a real transaction on every backend.
        self._transactional = sessions.kw["bind"]
        self.storage = storage
        self.budget = budget
        self.clients = clients
        self.clock = clock
        self.rng = rng or random.Random()
        self.monotonic = monotonic
        self._renew_every = settings.lease_seconds / LEASE_RENEWALS_PER_LEASE
        # A reservation lives for the call's own bound; renewing at a third of it keeps a
        # live transfer's slot however slowly the bytes come.
        self._renew_reservation_every = in_flight_ttl(settings) / 3
        # Consecutive failures of the store open the breaker; integrity refusals and key
        # bugs say nothing about the store's health and do not count.
        self.storage_breaker = pybreaker.CircuitBreaker(
            fail_max=settings.storage_breaker_failures,
            reset_timeout=settings.storage_breaker_reset_seconds,
            exclude=[StorageIntegrityError, InvalidKeyError],
            throw_new_error_on_trip=False,
            name="storage",
        )
        self._probe_lock = threading.Lock()
        # Built once: a Retrying keeps its per-call state thread-local, so every thread shares
        # it, and a finishing write (every item) builds nothing.
        self._finishing_retries = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(DATABASE_UNREACHABLE),
            stop=tenacity.stop_after_delay(FINISH_RETRY_SECONDS),
            wait=tenacity.wait_exponential_jitter(multiplier=0.5, max=5.0),
            before_sleep=_log_finish_waiting,
            reraise=True,
        )
        # Attempts in flight in this process, for a bounded shutdown (abandon_all).
        self.stopping = threading.Event()
        self._active: dict[int, _Attempt] = {}
        self._active_lock = threading.Lock()

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
        started = time.monotonic()
        if self.stopping.is_set():
            # The message is acknowledged unrun; the row is still pending and due, and the
            # reconciler wakes it for another worker.
            return AttemptResult(item_id, SKIPPED, None, ABANDONED)
        if not self.storage_available():
            return self._defer_unclaimed(item_id)
        work = self.claim(item_id)
        if work is None:
            metrics.DOWNLOADS.labels(SKIPPED, "").inc()
            log.info("download item=%s outcome=skipped (not due, leased or finished)", item_id)
            return AttemptResult(item_id, SKIPPED, None)
        attempt = _Attempt(
            work,
            self.clients(work.credentials),
            renew_at=self.monotonic() + self._renew_every,
        )
        with self._active_lock:
            self._active[work.id] = attempt
        try:
            result = self._attempt(attempt)
        finally:
            with self._active_lock:
                self._active.pop(work.id, None)
        result = replace(result, seconds=time.monotonic() - started)
        self._record(work, result)
        return result

    def _attempt(self, attempt: _Attempt) -> AttemptResult:
        work = attempt.work
        try:
            verified = self._fetch_verified(attempt)
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
        except Abandoned:
            self._hand_back(work)
            return AttemptResult(work.id, SKIPPED, None, ABANDONED)

    # --- faults: the object store, a stopping worker -------------------------------------

    def storage_available(self) -> bool:
        """False while the storage breaker is open. Once its pause has passed, one thread
        probes the store (``Storage.check``) and closes the breaker if it answers."""
        if self.storage_breaker.current_state == pybreaker.STATE_CLOSED:
            return True
        if not self._probe_lock.acquire(blocking=False):
            return False  # another thread is probing
        try:
            self.storage_breaker.call(self.storage.check)
        except (pybreaker.CircuitBreakerError, StorageError, OSError):
            return False
        finally:
            self._probe_lock.release()
        log.warning("storage answers again; downloads resume")
        return True

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
        """Stop every attempt in flight in this process and hand its row back: lease
        cleared, due now, budget slot released. Returns how many were handed back.

        Called once when a worker's shutdown bound is reached. Transfers stop at their next
        chunk; one blocked in a read is handed back from here, and its thread, once it
        wakes, finds the row no longer its own and writes nothing.
        """
        self.stopping.set()
        with self._active_lock:
            attempts = list(self._active.values())
        for attempt in attempts:
            if attempt.reservation is not None:
                try:
                    self.budget.release(attempt.reservation)
                except BudgetUnavailable as exc:
                    log.warning("shutdown: could not release a budget slot (%s)", exc)
            self._hand_back(attempt.work)
        return len(attempts)

    def _hand_back(self, work: WorkItem) -> None:
        with self._one_statement.begin() as connection:
            media_rows.hand_back(connection, work.id, work.owner, self.clock())

    def claim(self, item_id: int) -> WorkItem | None:
        """Take the row with a lease, or return None if it is not ours to work on now.

        A row stuck in ``downloading`` whose lease ran out ``max_lease_losses`` times is left
        for the reconciler to fail as ``worker_lost`` rather than crash another worker.
        """
        now = self.clock()
        owner = new_lease_owner()
        # Before claiming: without a usable key (INGEST_SECRET_KEY unset on a server
        # database) no row is claimed only to fail; the row stays due for a fixed worker.
        box = secret_box(self.settings)
        # Core execution of statements built once: the ORM's bulk-update path and a fresh
        # cache key per call were a large share of the worker's CPU per item.
        with self._one_statement.begin() as connection:
            claimed = media_rows.claim(
                connection,
                item_id,
                owner=owner,
                now=now,
                lease_until=now + timedelta(seconds=self.settings.lease_seconds),
                max_lease_losses=self.settings.max_lease_losses,
            )
        if claimed is None:
            return None
        item, instance = claimed
        try:
            api_key = box.decrypt(instance.instance_api_key_encrypted)
        except SecretKeyError:
            # Encrypted with a key this process lacks: no fault of the row's. Hand it back as
            # it was (attempt given back) for when the keys are fixed, and say so loudly.
            with self._one_statement.begin() as connection:
                media_rows.hand_back(connection, item_id, owner, now)
            raise
        # The URL's five minutes started when it was issued (ingest.intake.issued_at: the
        # receipt, or the message's time for a late redelivery), which its deadline records.
        issued = item.received_at if item.url_deadline is None else item.url_deadline - URL_LIFETIME
        fresh = item.download_url is not None and now - issued < timedelta(
            seconds=self.settings.url_fresh_seconds
        )
        return WorkItem(
            id=item_id,
            owner=owner,
            attempts=item.attempts,
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

    # --- locate, download, verify ----------------------------------------------------------

    def _fetch_verified(self, attempt: _Attempt) -> _Verified:
        work = attempt.work
        if self.clock() >= work.expires_at:
            raise AttemptFailed(Outcome.EXPIRED, "media id expired before a copy was stored")
        if not work.connected:
            raise AttemptFailed(
                Outcome.INSTANCE_DISCONNECTED, "instance is marked disconnected; no call made"
            )
        url = work.fresh_url
        if url is not None:
            attempt.url_used = True
        else:
            url = self._resolve(attempt)
        # One fresh URL is allowed for a URL the CDN refused, and one for bytes that did not
        # match: enough to get past a stale link or a corrupted transfer, never a loop.
        refresh_for_rejection = refresh_for_mismatch = True
        while True:
            spool = HashingSpool(cap=self._cap(attempt))
            try:
                self._download(attempt, url, spool)
                problem = checksum_problem(spool.size, spool.sha256, self._expected(attempt))
                if problem is None:
                    verdict = check_mime(self._declared_mime(attempt), spool.head)
                    if not verdict.ok:
                        raise AttemptFailed(Outcome.UNSUPPORTED_TYPE, verdict.problem or "")
                    return _Verified(spool, verdict.mime)
            except UrlRejected as exc:
                spool.close()
                if not (refresh_for_rejection and work.media_id):
                    raise AttemptFailed(Outcome.URL_REJECTED, _describe(exc)) from None
                refresh_for_rejection = False
                url = self._resolve(attempt)
                continue
            except BaseException:
                spool.close()
                raise
            spool.close()
            if not (refresh_for_mismatch and work.media_id):
                raise AttemptFailed(Outcome.CHECKSUM_MISMATCH, problem)
            refresh_for_mismatch = False
            log.warning(
                "download item=%s checksum mismatch (%s); retrying with a fresh URL",
                work.id,
                problem,
            )
            url = self._resolve(attempt)

    def _resolve(self, attempt: _Attempt) -> str:
        work = attempt.work
        if not work.media_id:
            raise AttemptFailed(Outcome.MEDIA_NOT_FOUND, "URL is stale and there is no media id")
        limits = limits_for(
            self.settings, work.credentials.provider, work.credentials.phone_number_id, "lookup"
        )
        attempt.resolves += 1
        metrics.URL_RESOLUTIONS.labels(work.credentials.provider.value).inc()
        try:
            with guarded(
                self.budget, limits, max_wait_seconds=self.settings.error_budget_wait_seconds
            ):
                location = attempt.client.resolve(work.media_id)
        except (ProviderError, BudgetExhausted, BudgetUnavailable) as exc:
            raise _failure_for(exc, "lookup", work.credentials.provider) from None
        attempt.location = location
        return location.url

    def _download(self, attempt: _Attempt, url: str, spool: HashingSpool) -> None:
        work = attempt.work
        limits = limits_for(
            self.settings, work.credentials.provider, work.credentials.phone_number_id, "download"
        )
        attempt.downloads += 1
        try:
            with guarded(
                self.budget, limits, max_wait_seconds=self.settings.error_budget_wait_seconds
            ) as reservation:
                attempt.reservation = reservation
                attempt.reservation_renew_at = self.monotonic() + self._renew_reservation_every
                try:
                    with attempt.client.download(url, max_bytes=spool.cap) as chunks:
                        for chunk in chunks:
                            spool.write(chunk)
                            self._keep_lease(attempt, "while downloading; stopped without storing")
                finally:
                    attempt.reservation = None
        except UrlRejected:
            raise
        except (ProviderError, BudgetExhausted, BudgetUnavailable) as exc:
            raise _failure_for(exc, "download", work.credentials.provider) from None
        except BodyTooLarge as exc:
            raise AttemptFailed(Outcome.TOO_LARGE, str(exc)) from None
        except OSError as exc:
            # The local spool (temp disk) failed: this machine's problem, not the media's.
            raise AttemptFailed(
                Outcome.STORAGE_UNAVAILABLE, f"spooling failed: {exc.strerror or 'OSError'}"
            ) from None

    def _keep_lease(self, attempt: _Attempt, when: str) -> None:
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

    def _cap(self, attempt: _Attempt) -> int:
        """100 MB, and never more than any size the provider stated."""
        caps = [self.settings.max_media_bytes]
        if attempt.work.declared_size is not None:
            caps.append(attempt.work.declared_size)
        if attempt.location is not None and attempt.location.file_size is not None:
            caps.append(attempt.location.file_size)
        return min(caps)

    def _expected(self, attempt: _Attempt) -> list[Expectation]:
        work = attempt.work
        expected = [Expectation("webhook", work.declared_sha256, work.declared_size)]
        if attempt.location is not None:
            expected.append(
                Expectation("lookup", attempt.location.sha256, attempt.location.file_size)
            )
        return expected

    def _declared_mime(self, attempt: _Attempt) -> str | None:
        if attempt.work.declared_mime:
            return attempt.work.declared_mime
        return attempt.location.mime_type if attempt.location is not None else None

    # --- finish --------------------------------------------------------------------------

    def _store(self, attempt: _Attempt, verified: _Verified) -> AttemptResult:
        work = attempt.work
        spool = verified.spool
        key = object_key(
            work.instance_name, work.media_type.value, work.media_id or work.message_id
        )
        # Renewing here if due means a lost lease writes nothing and the upload starts with at
        # least two thirds of a lease left. The upload itself is not renewed: one that outlasts
        # even that is wasted work, not wrong. Keys are deterministic and objects never
        # overwritten, so the next owner's put finds the same verified bytes, and the guarded
        # record below reports the loss instead of recording the copy.
        self._keep_lease(attempt, "before uploading; nothing was stored")
        try:
            stored = self.storage_breaker.call(
                self.storage.put,
                key,
                spool.reader(),
                size=spool.size,
                sha256=spool.sha256,
                content_type=verified.mime,
            )
        except pybreaker.CircuitBreakerError:
            raise AttemptFailed(
                Outcome.STORAGE_UNAVAILABLE, "storage is failing; upload not attempted"
            ) from None
        except StorageError as exc:
            raise AttemptFailed(Outcome.STORAGE_UNAVAILABLE, _short(str(exc))) from None
        except OSError as exc:
            raise AttemptFailed(
                Outcome.STORAGE_UNAVAILABLE, f"storage failed: {exc.strerror or 'OSError'}"
            ) from None
        now = self.clock()
        over_limit = over_send_limit(work.media_type, spool.size, animated=work.animated)
        # Without a callback URL the record is one statement, in autocommit; with one, the
        # event is written in the transaction that records the copy (the outbox).
        engine = self._transactional if work.announces else self._one_statement

        def write() -> bool:
            with engine.begin() as connection:
                recorded = media_rows.finish_stored(
                    connection,
                    work.id,
                    work.owner,
                    backend=stored.backend,
                    key=stored.key,
                    size=spool.size,
                    sha256=spool.sha256,
                    mime=verified.mime,
                    over_limit=over_limit,
                    now=now,
                )
                if recorded and work.announces:
                    callbacks.announce(connection, [work.id], now)
                return recorded

        if not self._through_outage(write, work):
            # The object is in place under its deterministic key; whoever holds the lease
            # now will find it there and record it. Unless the row was erased or purged
            # meanwhile: then nobody will, and the copy must not outlive the request.
            try:
                delete_if_removed(self.sessions, self.storage, work.id, stored.key)
            except (StorageError, *DATABASE_DOWN) as exc:
                log.error(
                    "download item=%s: could not check or delete a copy uploaded while the "
                    "row was removed (%s); erase it again",
                    work.id,
                    type(exc).__name__,
                )
            raise LeaseLost("lost its lease before recording the copy")
        return AttemptResult(work.id, Outcome.STORED, MediaState.STORED, size=spool.size)

    def _finish_unstored(self, attempt: _Attempt, failure: AttemptFailed) -> AttemptResult:
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
        self._through_outage(lambda: self._write_unstored(attempt, decision, failure, now), work)
        return AttemptResult(
            work.id,
            decision.outcome,
            decision.state,
            decision.failure_reason,
            next_attempt_at=decision.next_attempt_at,
        )

    def _through_outage(self, write: Callable[[], _T], work: WorkItem) -> _T:
        """Run a finishing write, again and again while the database is unreachable, for up
        to :data:`FINISH_RETRY_SECONDS`; then the error propagates and the lease takes over."""
        result: _T = self._finishing_retries(_finish, write, item_id=work.id)
        return result

    def _write_unstored(
        self, attempt: _Attempt, decision: Decision, failure: AttemptFailed, now: datetime
    ) -> None:
        work = attempt.work
        with session_scope(self.sessions) as session:
            written = media_rows.finish_not_stored(
                session,
                work.id,
                work.owner,
                decision,
                last_error=_short(failure.detail),
                url_used=attempt.url_used,
                now=now,
            )
            if (
                work.announces
                and decision.state in (MediaState.FAILED, MediaState.EXPIRED)
                and written
            ):
                callbacks.announce(session, [work.id], now)
            if decision.disconnect:
                # Only the attempt that flips the instance says so: other rows of the same
                # instance often meet the same 401 moments later.
                reason = str(failure.outcome)
                flipped = session.execute(
                    update(Instance)
                    .where(Instance.id == work.instance_id, Instance.connected.is_(True))
                    .values(
                        connected=False,
                        disconnected_reason=_short(f"{reason}: {failure.detail}"),
                        disconnected_at=now,
                    )
                )
                if getattr(flipped, "rowcount", 0) == 1:
                    metrics.INSTANCE_DISCONNECTS.labels(
                        work.credentials.provider.value, reason
                    ).inc()
                    log.warning(
                        "instance %s disconnected (%s: %s): no provider calls for it until "
                        "`ingest instance connect %s`; stored media is still served",
                        work.instance_name,
                        reason,
                        _short(failure.detail),
                        work.instance_name,
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


def _finish(write: Callable[[], _T], *, item_id: int) -> _T:
    # item_id rides along for _log_finish_waiting, which sees only the call's arguments.
    return write()


def _log_finish_waiting(state: tenacity.RetryCallState) -> None:
    log.warning(
        "download item=%s cannot record its result yet (database unreachable); retrying",
        state.kwargs.get("item_id"),
    )


def _failure_for(exc: Exception, endpoint: str, provider: Provider) -> AttemptFailed:
    """Provider and budget errors -> the outcome the retry table knows them by."""
    if isinstance(exc, BudgetExhausted):
        metrics.BUDGET_BLOCKED.labels(provider.value, exc.key.split(":", 1)[0]).inc()
        return AttemptFailed(
            Outcome.BUDGET_EXHAUSTED,
            f"error budget for this number is spent ({endpoint})",
            not_before=exc.retry_at,
        )
    if isinstance(exc, BudgetUnavailable):
        return AttemptFailed(Outcome.BUDGET_UNAVAILABLE, f"error budget unavailable: {exc}")
    assert isinstance(exc, ProviderError)
    metrics.PROVIDER_ERRORS.labels(
        provider.value, endpoint, f"{exc.status // 100}xx" if exc.status else "none"
    ).inc()
    detail = _describe(exc)
    if isinstance(exc, ProviderRejected):
        return AttemptFailed(Outcome.PROVIDER_REJECTED, detail)
    if isinstance(exc, ProviderAuthError):
        return AttemptFailed(Outcome.INSTANCE_UNAUTHORIZED, detail)
    if isinstance(exc, MediaNotFound):
        return AttemptFailed(Outcome.MEDIA_NOT_FOUND, detail)
    if isinstance(exc, UrlRejected):
        return AttemptFailed(Outcome.URL_REJECTED, detail)
    if isinstance(exc, ProviderThrottled):
        return AttemptFailed(Outcome.THROTTLED, detail, retry_after=exc.retry_after)
    if isinstance(exc, ProviderUnavailable):
        return AttemptFailed(Outcome.PROVIDER_UNAVAILABLE, detail, retry_after=exc.retry_after)
    if isinstance(exc, DisallowedHost):
        return AttemptFailed(Outcome.DISALLOWED_HOST, detail)
    if isinstance(exc, TooLarge):
        return AttemptFailed(Outcome.TOO_LARGE, detail)
    if exc.retryable:
        return AttemptFailed(Outcome.PROVIDER_UNAVAILABLE, detail, retry_after=exc.retry_after)
    return AttemptFailed(Outcome.PROVIDER_ERROR, detail)


def _describe(exc: ProviderError) -> str:
    # Provider error messages never contain a URL or a key (the providers' contract).
    status = f"HTTP {exc.status}: " if exc.status else ""
    return _short(f"{exc.endpoint} {status}{exc}")


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
