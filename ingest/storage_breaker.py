"""The download pipeline's circuit breaker on the object store.

After ``storage_breaker_failures`` consecutive failed uploads the pipeline stops claiming (rows
are deferred, no provider call is spent on bytes that could not be kept); once the breaker's
pause (``storage_breaker_reset_seconds``) has passed, one thread probes the store
(``Storage.check``) and closes it if the store answers. Uploads go through the breaker, and a
failed one ends the attempt as ``storage_unavailable``.
"""

from __future__ import annotations

import logging
import threading
from typing import BinaryIO

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
        """``Storage.put`` through the breaker; a failure raises :class:`AttemptFailed`."""
        try:
            return self._breaker.call(
                storage.put, key, stream, size=size, sha256=sha256, content_type=content_type
            )
        except pybreaker.CircuitBreakerError:
            raise AttemptFailed(
                Outcome.STORAGE_UNAVAILABLE, "storage is failing; upload not attempted"
            ) from None
        except StorageError as exc:
            raise AttemptFailed(Outcome.STORAGE_UNAVAILABLE, short(str(exc))) from None
        except OSError as exc:
            raise AttemptFailed(
                Outcome.STORAGE_UNAVAILABLE, f"storage failed: {exc.strerror or 'OSError'}"
            ) from None
