"""The storage breaker: uploads run side by side, failures in a row open it, others do not."""

from __future__ import annotations

import hashlib
import io
import threading
from typing import Any

import pytest

from ingest.attempt_errors import AttemptFailed
from ingest.settings import Settings
from ingest.storage import MemoryStorage, StorageError, StorageIntegrityError
from ingest.storage_breaker import StorageBreaker

BODY = b"verified bytes"
SHA256 = hashlib.sha256(BODY).hexdigest()


class ScriptedStorage(MemoryStorage):
    """Puts that fail while ``failing`` is set, and can be made to wait for each other."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: Exception | None = None
        self.rendezvous: threading.Barrier | None = None
        self.puts = 0

    def put(self, *args: Any, **kwargs: Any) -> Any:
        self.puts += 1
        if self.rendezvous is not None:
            self.rendezvous.wait()
        if self.failing is not None:
            raise self.failing
        return super().put(*args, **kwargs)

    def check(self) -> None:
        if self.failing is not None:
            raise StorageError("bucket not reachable")


def _put(breaker: StorageBreaker, storage: ScriptedStorage, key: str) -> Any:
    return breaker.put(
        storage, key, io.BytesIO(BODY), size=len(BODY), sha256=SHA256, content_type="image/jpeg"
    )


def _fail(
    breaker: StorageBreaker,
    storage: ScriptedStorage,
    error: Exception,
    times: int,
    raised: type[Exception] = AttemptFailed,
) -> None:
    """``times`` uploads failing with ``error``, each raising ``raised`` with its message."""
    storage.failing = error
    for n in range(times):
        with pytest.raises(raised, match=str(error)):
            _put(breaker, storage, f"failing-{n}")


@pytest.fixture
def breaker(make_settings: Any) -> StorageBreaker:
    settings: Settings = make_settings(
        storage_breaker_failures=3, storage_breaker_reset_seconds=60.0
    )
    return StorageBreaker(settings)


def test_uploads_of_one_process_run_at_the_same_time(breaker: StorageBreaker) -> None:
    """Each put waits until the other has started: uploads serialised by the breaker's lock
    (pybreaker holds it around the call) would leave the first waiting alone and fail."""
    storage = ScriptedStorage()
    storage.rendezvous = threading.Barrier(2, timeout=5)
    errors: list[BaseException] = []

    def upload(key: str) -> None:
        try:
            _put(breaker, storage, key)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(f"k{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert errors == []
    assert storage.puts == 2


def test_failures_in_a_row_open_it_and_then_no_upload_is_tried(
    breaker: StorageBreaker,
) -> None:
    storage = ScriptedStorage()
    _fail(breaker, storage, StorageError("503 Slow Down"), times=3)

    with pytest.raises(AttemptFailed, match="upload not attempted"):
        _put(breaker, storage, "k3")
    assert storage.puts == 3
    assert not breaker.available(storage)  # the pause has not passed


def test_a_success_between_failures_starts_the_count_again(breaker: StorageBreaker) -> None:
    storage = ScriptedStorage()
    _fail(breaker, storage, StorageError("timeout"), times=2)
    storage.failing = None
    assert _put(breaker, storage, "good").key == "good"
    _fail(breaker, storage, StorageError("timeout"), times=2)

    storage.failing = None
    assert breaker.available(storage)
    assert _put(breaker, storage, "still-closed").key == "still-closed"


def test_integrity_refusals_say_nothing_about_the_store(breaker: StorageBreaker) -> None:
    storage = ScriptedStorage()
    _fail(breaker, storage, StorageIntegrityError("sha256 mismatch"), times=5)

    assert storage.puts == 5  # never opened
    assert breaker.available(storage)


def test_an_unexpected_error_is_counted_and_raised_as_it_is(breaker: StorageBreaker) -> None:
    storage = ScriptedStorage()
    _fail(breaker, storage, RuntimeError("bug in a backend"), times=3, raised=RuntimeError)

    with pytest.raises(AttemptFailed, match="upload not attempted"):
        _put(breaker, storage, "k3")
