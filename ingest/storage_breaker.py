"""The download pipeline's circuit breaker on the object store.

After ``storage_breaker_failures`` consecutive failed uploads the pipeline stops claiming (rows
are deferred, no provider call is spent on bytes that could not be kept); once the breaker's
pause (``storage_breaker_reset_seconds``) has passed, one thread probes the store
(``Storage.check``) and closes it if the store answers. A failed upload ends the attempt as
``storage_unavailable``.

pybreaker keeps the state (the failure count, open, half-open, the pause), but an upload does
not run inside ``CircuitBreaker.call``: that holds the breaker's lock for the whole call, so
a worker process's uploads went one at a time (a quarter of its threads' samples were
waiting on that lock, docs/THROUGHPUT.md; upstream danielfm/pybreaker#3, and the change that
removed the lock, #57, was not merged). The upload runs first, unlocked, and its outcome is
then replayed through ``call``, which only holds the lock to count it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import BinaryIO, NoReturn

import pybreaker

from ingest.attempt_errors import AttemptFailed, short
from ingest.retry_policy import Outcome
from ingest.settings import Settings
from ingest.storage import (
    InvalidKeyError,
    Storage,
    StorageError,
    StorageIntegrityError,
    StoredObject,
)

# The pipeline's logger: these lines are part of an attempt's story, read and filtered with it.
log = logging.getLogger("ingest.pipeline")


class StorageBreaker:
    def __init__(self, settings: Settings) -> None:
        # Consecutive failures of the store open the breaker; integrity refusals and key
        # bugs say nothing about the store's health and do not count.
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=settings.storage_breaker_failures,
            reset_timeout=settings.storage_breaker_reset_seconds,
            exclude=[StorageIntegrityError, InvalidKeyError],
            throw_new_error_on_trip=False,
            name="storage",
        )
        self._probe_lock = threading.Lock()

    def available(self, storage: Storage) -> bool:
        """False while the breaker is open. Once its pause has passed, one thread probes the
        store (``Storage.check``) and closes the breaker if it answers."""
        if self._breaker.current_state == pybreaker.STATE_CLOSED:
            return True
        if not self._probe_lock.acquire(blocking=False):
            return False  # another thread is probing
        try:
            self._breaker.call(storage.check)
        except (pybreaker.CircuitBreakerError, StorageError, OSError):
            return False
        finally:
            self._probe_lock.release()
        log.warning("storage answers again; downloads resume")
        return True

    def put(
        self,
        storage: Storage,
        key: str,
        stream: BinaryIO,
        *,
        size: int,
        sha256: str,
        content_type: str,
    ) -> StoredObject:
        """``Storage.put`` unless the breaker is open; a failure raises :class:`AttemptFailed`."""
        if self._breaker.current_state == pybreaker.STATE_OPEN:
            raise AttemptFailed(
                Outcome.STORAGE_UNAVAILABLE, "storage is failing; upload not attempted"
            )
        try:
            stored = storage.put(key, stream, size=size, sha256=sha256, content_type=content_type)
        except Exception as exc:
            self._count_failure(exc)
            if isinstance(exc, StorageError):
                raise AttemptFailed(Outcome.STORAGE_UNAVAILABLE, short(str(exc))) from None
            if isinstance(exc, OSError):
                raise AttemptFailed(
                    Outcome.STORAGE_UNAVAILABLE, f"storage failed: {exc.strerror or 'OSError'}"
                ) from None
            raise
        self._count_success()
        return stored

    def _count_failure(self, exc: Exception) -> None:
        # The breaker counts it (excluded exceptions aside) and may open.
        # What comes back out is exc itself or the breaker's own error: both already handled.
        with contextlib.suppress(Exception):
            self._breaker.call(_raise, exc)

    def _count_success(self) -> None:
        # Resets the consecutive failures; an upload that succeeds while another thread
        # just opened the breaker leaves it open (the probe decides when to close it).
        with contextlib.suppress(pybreaker.CircuitBreakerError):
            self._breaker.call(_succeed)


def _raise(exc: Exception) -> NoReturn:
    raise exc


def _succeed() -> None:
    return None
