"""The download pipeline against a scripted fake provider, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session, sessionmaker

from ingest import metrics
from ingest import pipeline as pipeline_module
from ingest.error_budget import (
    BudgetExhausted,
    BudgetLimit,
    SqlErrorBudget,
    count_events,
    in_flight_ttl,
)
from ingest.media_rules import object_key
from ingest.models import Instance, MediaItem, MediaState, Provider, utcnow
from ingest.pipeline import Pipeline
from ingest.providers import (
    Credentials,
    MediaLocation,
    MediaNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    TooLarge,
    UrlRejected,
)
from ingest.settings import Settings
from ingest.storage import MemoryStorage, StorageError
from tests.factories import make_instance, make_media_item

CHUNK = 64 * 1024
SIGNATURE = "sig=SECRET-signature"


def jpeg(size: int = 3000, seed: int = 0) -> bytes:
    body = random.Random(seed).randbytes(max(size - 11, 0))
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + body


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 2000


@dataclass
class FakeMedia:
    body: bytes
    mime: str = "image/jpeg"
    sha256: str | None = None  # what the lookup states; the real digest unless set
    file_size: int | None = None

    def __post_init__(self) -> None:
        self.sha256 = self.sha256 or hashlib.sha256(self.body).hexdigest()
        self.file_size = len(self.body) if self.file_size is None else self.file_size


@dataclass
class FakeProvider:
    """Media ids and scripted failures; records every call (never a real network)."""

    media: dict[str, FakeMedia] = field(default_factory=dict)
    lookup_errors: list[ProviderError] = field(default_factory=list)
    download_errors: list[ProviderError] = field(default_factory=list)
    corrupt_downloads: int = 0
    calls: list[tuple[str, str]] = field(default_factory=list)
    max_bytes_seen: list[int] = field(default_factory=list)
    chunks_served: int = 0
    # Called with each chunk's index before it is sent, and with the count after the last:
    # where a test makes time pass mid-transfer (a slow link) or another worker step in.
    on_chunk: Callable[[int], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _serial: int = 0

    def add(self, media_id: str, body: bytes, **stated: Any) -> FakeMedia:
        self.media[media_id] = FakeMedia(body, **stated)
        return self.media[media_id]

    @staticmethod
    def webhook_url(media_id: str) -> str:
        return f"https://cdn.test/webhook/{media_id}?{SIGNATURE}"

    def client(self, credentials: Credentials) -> FakeClient:
        return FakeClient(self, credentials)

    def count(self, kind: str) -> int:
        return sum(1 for call, _ in self.calls if call == kind)


class FakeClient:
    def __init__(self, provider: FakeProvider, credentials: Credentials) -> None:
        self.provider = provider
        self.credentials = credentials

    def resolve(self, media_id: str) -> MediaLocation:
        p = self.provider
        with p._lock:
            p.calls.append(("lookup", media_id))
            if p.lookup_errors:
                raise p.lookup_errors.pop(0)
            p._serial += 1
            media = p.media[media_id]
            url = f"https://cdn.test/fresh/{media_id}?n={p._serial}&{SIGNATURE}"
        return MediaLocation(url, media.mime, media.sha256, media.file_size)

    @contextmanager
    def download(self, url: str, *, max_bytes: int) -> Iterator[Iterator[bytes]]:
        p = self.provider
        media_id = url.split("?")[0].rsplit("/", 1)[1]
        with p._lock:
            p.calls.append(("download", url.split("/")[3]))
            p.max_bytes_seen.append(max_bytes)
            if p.download_errors:
                raise p.download_errors.pop(0)
            body = p.media[media_id].body
            if p.corrupt_downloads:
                p.corrupt_downloads -= 1
                body = body[:-1] + bytes([body[-1] ^ 0xFF])

        def chunks() -> Iterator[bytes]:
            sent = 0
            for start in range(0, len(body), CHUNK):
                chunk = body[start : start + CHUNK]
                if sent + len(chunk) > max_bytes:
                    raise TooLarge(
                        "body passed the cap", endpoint="download", counts_against_budget=False
                    )
                sent += len(chunk)
                with p._lock:
                    p.chunks_served += 1
                if p.on_chunk is not None:
                    p.on_chunk(start // CHUNK)
                yield chunk
            if p.on_chunk is not None:
                p.on_chunk(-(-len(body) // CHUNK))

        yield chunks()


class Clock:
    """Wall clock and monotonic clock in one, so moving one moves the other."""

    def __init__(self) -> None:
        self.now = self._start = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return (self.now - self._start).total_seconds()

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Env:
    settings: Settings
    sessions: sessionmaker[Session]
    provider: FakeProvider
    storage: MemoryStorage
    budget: SqlErrorBudget
    pipeline: Pipeline
    clock: Clock
    instance_id: int

    def item(
        self, media_id: str, *, fresh: bool = True, instance_id: int | None = None, **row: Any
    ) -> int:
        now = self.clock()
        received = now if fresh else now - timedelta(minutes=10)
        values: dict[str, Any] = {
            "media_id": media_id,
            "received_at": received,
            "next_attempt_at": received,
            "download_url": FakeProvider.webhook_url(media_id),
            "url_deadline": received + timedelta(minutes=5),
            "expires_at": received + timedelta(days=7),
        }
        values.update(row)
        with self.sessions.begin() as session:
            instance = session.get(Instance, instance_id or self.instance_id)
            assert instance is not None
            return make_media_item(session, instance, **values).id

    def row(self, item_id: int) -> MediaItem:
        with self.sessions() as session:
            item = session.get(MediaItem, item_id)
            assert item is not None
            return item

    def phone_number_id(self) -> str:
        with self.sessions() as session:
            instance = session.get(Instance, self.instance_id)
            assert instance is not None
            return instance.phone_number_id

    def make_due(self, item_id: int) -> None:
        """Move the clock past the row's next attempt."""
        due = self.row(item_id).next_attempt_at
        self.clock.now = max(self.clock.now, due + timedelta(seconds=1))


def build_env(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    row_slots: int | None = None,
    **instance: Any,
) -> Env:
    clock = Clock()
    provider = FakeProvider()
    storage = MemoryStorage()
    budget = SqlErrorBudget.from_settings(sessions, settings, clock=clock)
    pipeline = Pipeline(
        settings=settings,
        sessions=sessions,
        storage=storage,
        budget=budget,
        clients=provider.client,
        clock=clock,
        rng=random.Random(0),
        monotonic=clock.monotonic,
        row_slots=row_slots,
    )
    with sessions.begin() as session:
        instance_id = make_instance(session, **instance).id
    return Env(settings, sessions, provider, storage, budget, pipeline, clock, instance_id)


@pytest.fixture
def env(settings: Settings, sessions: sessionmaker[Session]) -> Env:
    return build_env(settings, sessions)


def media_rows_of(env: Env, prefix: str, count: int) -> list[int]:
    """``count`` due rows, each with its own image at the provider (``jpeg(seed=n)``)."""
    for n in range(count):
        env.provider.add(f"{prefix}{n}", jpeg(seed=n))
    return [env.item(f"{prefix}{n}") for n in range(count)]


def stored_bytes(env: Env, item_id: int) -> bytes:
    row = env.row(item_id)
    assert row.storage_key is not None
    with env.storage.open(row.storage_key) as body:
        return body.read()


# --- the happy paths and the URL rule ---------------------------------------------------


def test_fresh_webhook_url_is_downloaded_verified_and_stored_without_a_lookup(env: Env) -> None:
    body = jpeg()
    env.provider.add("m1", body)
    item_id = env.item(
        "m1", declared_sha256=hashlib.sha256(body).hexdigest(), declared_size=len(body)
    )

    result = env.pipeline.run(item_id)

    assert (result.outcome, result.state, result.size) == ("stored", "stored", len(body))
    assert env.provider.calls == [("download", "webhook")]
    row = env.row(item_id)
    assert row.state == MediaState.STORED
    assert (row.size, row.actual_sha256, row.actual_mime) == (
        len(body),
        hashlib.sha256(body).hexdigest(),
        "image/jpeg",
    )
    assert row.storage_backend == "memory" and row.stored_at is not None
    assert row.download_url is None and row.lease_owner is None and row.lease_until is None
    assert row.attempts == 1 and not row.over_send_limit
    assert stored_bytes(env, item_id) == body


def _downloads_counted(outcome: str, reason: str) -> float:
    for family in metrics.DOWNLOADS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {
                "outcome": outcome,
                "reason": reason,
            }:
                return sample.value
    return 0.0


def test_a_stored_download_is_counted_under_its_outcome(env: Env) -> None:
    body = jpeg()
    env.provider.add("m-metrics", body)
    item_id = env.item("m-metrics", declared_sha256=hashlib.sha256(body).hexdigest())
    stored_before = _downloads_counted("stored", "stored")
    skipped_before = _downloads_counted("skipped", "")

    env.pipeline.run(item_id)
    env.pipeline.run(item_id)  # already stored: skipped, not counted twice as stored

    assert _downloads_counted("stored", "stored") == stored_before + 1
    assert _downloads_counted("skipped", "") == skipped_before + 1


def test_stale_url_costs_exactly_one_lookup(env: Env) -> None:
    env.provider.add("m2", jpeg())
    item_id = env.item("m2", fresh=False)
    assert env.pipeline.run(item_id).outcome == "stored"
    assert env.provider.calls == [("lookup", "m2"), ("download", "fresh")]


def test_a_late_redelivery_s_url_is_stale_however_recently_it_arrived(env: Env) -> None:
    env.provider.add("m-late", jpeg())
    # Received just now, but sent (and its URL issued) four and a half minutes ago.
    issued = env.clock() - timedelta(minutes=4, seconds=30)
    item_id = env.item("m-late", url_deadline=issued + timedelta(minutes=5))
    assert env.pipeline.run(item_id).outcome == "stored"
    assert env.provider.calls == [("lookup", "m-late"), ("download", "fresh")]


def test_a_fresh_url_the_cdn_refuses_is_resolved_once_more(env: Env) -> None:
    env.provider.add("m3", jpeg())
    env.provider.download_errors.append(
        UrlRejected("cdn said 403", endpoint="download", status=403)
    )
    item_id = env.item("m3")
    assert env.pipeline.run(item_id).outcome == "stored"
    assert env.provider.calls == [("download", "webhook"), ("lookup", "m3"), ("download", "fresh")]


def test_running_twice_is_harmless(env: Env) -> None:
    env.provider.add("m4", jpeg())
    item_id = env.item("m4")
    assert env.pipeline.run(item_id).outcome == "stored"
    assert env.pipeline.run(item_id).outcome == "skipped"
    assert env.provider.count("download") == 1
    assert len(env.storage.keys()) == 1


def test_object_keys_are_deterministic_so_a_repeat_leaves_one_object(env: Env) -> None:
    body = jpeg()
    env.provider.add("same-media", body)
    first = env.item("same-media")
    assert env.pipeline.run(first).outcome == "stored"
    # The same media id for the same instance (a re-sent message): same key, same bytes.
    second = env.item("same-media")
    assert env.pipeline.run(second).outcome == "stored"
    assert env.row(first).storage_key == env.row(second).storage_key
    assert env.storage.keys() == [env.row(first).storage_key]


def test_a_sticker_over_its_sending_limit_is_archived_and_flagged(env: Env) -> None:
    webp = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 150_000
    env.provider.add("sticker", webp, mime="image/webp")
    item_id = env.item("sticker", media_type="sticker", declared_mime="image/webp")
    assert env.pipeline.run(item_id).outcome == "stored"
    row = env.row(item_id)
    assert row.over_send_limit and row.actual_mime == "image/webp"


# --- the lease ------------------------------------------------------------------------------


def test_a_live_lease_blocks_a_second_claim_and_a_lapsed_one_does_not(env: Env) -> None:
    item_id = env.item("m5")
    first = env.pipeline.claim(item_id)
    assert first is not None
    assert env.pipeline.claim(item_id) is None
    env.clock.advance(env.settings.lease_seconds + 1)
    second = env.pipeline.claim(item_id)
    assert second is not None and second.owner != first.owner
    assert env.row(item_id).attempts == 2


def test_a_worker_that_lost_its_lease_cannot_record_its_result(env: Env) -> None:
    env.provider.add("m6", jpeg())
    item_id = env.item("m6")
    stale = env.pipeline.claim(item_id)
    assert stale is not None
    env.clock.advance(env.settings.lease_seconds + 1)
    assert env.pipeline.run(item_id).outcome == "stored"  # the new owner finishes
    from ingest.attempt_errors import AttemptFailed
    from ingest.in_flight import Attempt
    from ingest.retry_policy import Outcome

    # The old owner's late failure changes nothing.
    env.pipeline._finish_unstored(
        Attempt(stale, env.provider.client(stale.credentials)),
        AttemptFailed(Outcome.PROVIDER_REJECTED, "late"),
    )
    assert env.row(item_id).state == MediaState.STORED


@contextmanager
def media_updates(env: Env) -> Iterator[list[str]]:
    """The UPDATE statements sent for media rows while the block runs (one entry for an
    executemany, which runs the statement once for each of its parameter sets)."""
    engine = env.sessions.kw["bind"]
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE MEDIA_ITEMS"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_download_that_outlasts_a_third_of_the_lease_renews_it_and_is_stored(
    env: Env,
) -> None:
    body = jpeg(6 * CHUNK)
    env.provider.add("slow", body)
    item_id = env.item("slow")
    interval = env.settings.lease_seconds / 3
    leases: list[datetime | None] = []

    def slow_link(index: int) -> None:
        if index in (0, 4):
            leases.append(env.row(item_id).lease_until)
        if index == 3:
            env.clock.advance(interval + 1)

    env.provider.on_chunk = slow_link
    claimed_at = env.clock()
    with media_updates(env) as updates:
        result = env.pipeline.run(item_id)

    assert (result.outcome, result.state) == ("stored", "stored")
    assert leases == [
        claimed_at + timedelta(seconds=env.settings.lease_seconds),
        claimed_at + timedelta(seconds=interval + 1 + env.settings.lease_seconds),
    ]
    assert len(updates) == 3  # claim, one renewal, stored
    assert stored_bytes(env, item_id) == body


def test_a_fast_download_issues_no_renewal(env: Env) -> None:
    env.provider.add("quick", jpeg(100_000))
    item_id = env.item("quick")
    # A little short of the renewal interval: still the hot path.
    env.provider.on_chunk = lambda index: env.clock.advance(
        env.settings.lease_seconds / 3 - 1 if index == 0 else 0
    )
    with media_updates(env) as updates:
        assert env.pipeline.run(item_id).outcome == "stored"
    assert len(updates) == 2  # the claim and the stored record, nothing more


def test_a_download_whose_lease_another_worker_took_stops_and_stores_nothing(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.provider.add("stolen", jpeg(8 * CHUNK))
    item_id = env.item("stolen")
    takers: list[Any] = []

    def stall_then_lose_the_row(index: int) -> None:
        if index == 2:
            # The link stalls past the lease; another worker takes the row meanwhile.
            env.clock.advance(env.settings.lease_seconds + 1)
            takers.append(env.pipeline.claim(item_id))

    env.provider.on_chunk = stall_then_lose_the_row
    stored_before = _downloads_counted("stored", "stored")
    lost_before = _downloads_counted("skipped", "lease_lost")

    result = env.pipeline.run(item_id)

    assert (result.outcome, result.state, result.reason) == ("skipped", None, "lease_lost")
    assert env.provider.chunks_served == 3  # stopped at the first renewal, not at the end
    assert env.storage.keys() == []
    row = env.row(item_id)
    assert takers[0] is not None
    assert (row.state, row.lease_owner) == (MediaState.DOWNLOADING, takers[0].owner)
    assert row.lease_until == env.clock() + timedelta(seconds=env.settings.lease_seconds)
    assert _downloads_counted("stored", "stored") == stored_before
    assert _downloads_counted("skipped", "lease_lost") == lost_before + 1
    assert "lost its lease while downloading" in caplog.text


def test_a_lease_lost_after_the_stream_stops_the_attempt_before_the_upload(env: Env) -> None:
    env.provider.add("late", jpeg(3 * CHUNK))
    item_id = env.item("late")

    def lose_the_row_after_the_last_byte(index: int) -> None:
        if index == 3:
            env.clock.advance(env.settings.lease_seconds + 1)
            assert env.pipeline.claim(item_id) is not None

    env.provider.on_chunk = lose_the_row_after_the_last_byte
    result = env.pipeline.run(item_id)
    assert (result.outcome, result.reason) == ("skipped", "lease_lost")
    assert env.storage.keys() == []


def test_an_upload_after_a_long_download_starts_on_a_renewed_lease(env: Env) -> None:
    env.provider.add("long", jpeg(3 * CHUNK))
    item_id = env.item("long")
    env.provider.on_chunk = lambda index: env.clock.advance(
        env.settings.lease_seconds / 3 + 1 if index == 3 else 0
    )
    leases: list[datetime | None] = []

    class Watching(MemoryStorage):
        def put(self, *args: Any, **kwargs: Any) -> Any:
            leases.append(env.row(item_id).lease_until)
            return super().put(*args, **kwargs)

    env.pipeline.storage = Watching()
    assert env.pipeline.run(item_id).outcome == "stored"
    assert leases == [env.clock() + timedelta(seconds=env.settings.lease_seconds)]


def test_a_copy_whose_lease_was_lost_before_recording_is_not_counted_as_stored(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.provider.add("unrecorded", jpeg())
    item_id = env.item("unrecorded")

    class SlowUpload(MemoryStorage):
        def put(self, *args: Any, **kwargs: Any) -> Any:
            stored = super().put(*args, **kwargs)
            env.clock.advance(env.settings.lease_seconds + 1)
            assert env.pipeline.claim(item_id) is not None  # another worker took over
            return stored

    storage = SlowUpload()
    env.pipeline.storage = storage
    stored_before = _downloads_counted("stored", "stored")

    result = env.pipeline.run(item_id)

    assert (result.outcome, result.state, result.reason) == ("skipped", None, "lease_lost")
    assert _downloads_counted("stored", "stored") == stored_before
    assert "lost its lease before recording the copy" in caplog.text
    row = env.row(item_id)
    assert (row.state, row.storage_key) == (MediaState.DOWNLOADING, None)
    # The verified object stays under its key for the new owner to find and record.
    assert len(storage.keys()) == 1


class WorkerDied(BaseException):
    """A worker process killed where it is raised: nothing after it runs, nothing catches it."""


def copy_key(env: Env, item_id: int) -> str:
    """Where the pipeline keeps (and looks for) the row's copy."""
    row = env.row(item_id)
    with env.sessions() as session:
        instance = session.get(Instance, row.instance_id)
        assert instance is not None
        return object_key(instance.name, row.media_type, row.media_id or row.message_id)


def _earlier_copies_found() -> float:
    return metrics.EARLIER_COPIES_FOUND._value.get()


def test_a_copy_uploaded_by_a_worker_that_died_before_recording_it_is_recorded_without_downloading(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.pipeline")
    body = jpeg()
    env.provider.add("orphaned", body)
    item_id = env.item("orphaned", declared_sha256=hashlib.sha256(body).hexdigest())

    def die(*_args: Any) -> bool:
        raise WorkerDied

    monkeypatch.setattr(env.pipeline.finishing, "stored_many", die)
    with pytest.raises(WorkerDied):
        env.pipeline.run(item_id)
    monkeypatch.undo()
    assert env.row(item_id).state == MediaState.DOWNLOADING  # uploaded, not recorded
    assert len(env.storage.keys()) == 1
    recorded_before = _earlier_copies_found()

    env.clock.advance(env.settings.lease_seconds + 1)  # the dead worker's lease lapses
    result = env.pipeline.run(item_id)

    assert (result.outcome, result.state, result.size) == ("stored", "stored", len(body))
    assert env.provider.count("download") == 1  # the dead worker's, and no other
    row = env.row(item_id)
    assert (row.attempts, row.actual_sha256, row.actual_mime) == (
        2,
        hashlib.sha256(body).hexdigest(),
        "image/jpeg",
    )
    assert stored_bytes(env, item_id) == body
    assert _earlier_copies_found() == recorded_before + 1
    assert "the copy an earlier attempt stored is in place" in caplog.text


def test_an_earlier_copy_is_recorded_even_after_the_media_id_expired(env: Env) -> None:
    body = jpeg(seed=3)
    item_id = env.item(
        "expired-but-kept",
        # A first attempt by the count (an attempt handed back gives its count back): one
        # that cannot download at all still looks for a copy before giving the row up.
        attempts=0,
        expires_at=env.clock() - timedelta(minutes=1),
    )
    key = copy_key(env, item_id)
    env.storage.put(
        key,
        io.BytesIO(body),
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
        content_type="image/jpeg",
    )

    result = env.pipeline.run(item_id)

    assert (result.outcome, result.state) == ("stored", "stored")
    assert env.provider.calls == []
    assert env.row(item_id).storage_key == key


def test_an_object_that_contradicts_the_webhook_is_not_taken_for_an_earlier_copy(
    env: Env,
) -> None:
    body, other = jpeg(seed=4), jpeg(seed=5)
    env.provider.add("contradicted", body)
    item_id = env.item(
        "contradicted",
        attempts=1,
        lease_losses=1,  # its last attempt ended without a record: the pipeline looks
        declared_sha256=hashlib.sha256(body).hexdigest(),
    )
    env.storage.put(
        copy_key(env, item_id),
        io.BytesIO(other),
        size=len(other),
        sha256=hashlib.sha256(other).hexdigest(),
        content_type="image/jpeg",
    )

    result = env.pipeline.run(item_id)

    # Downloaded and checked as usual; the store then refuses to overwrite the other bytes.
    assert env.provider.count("download") == 1
    assert result.state != MediaState.STORED
    assert env.row(item_id).storage_key is None


def test_first_attempts_and_ordinary_retries_do_not_look_in_storage_for_an_earlier_copy(
    env: Env,
) -> None:
    heads: list[str] = []

    class Watching(MemoryStorage):
        def head(self, key: str) -> Any:
            heads.append(key)
            return super().head(key)

    env.pipeline.storage = Watching()
    env.provider.add("first", jpeg())
    env.provider.add("retried", jpeg(seed=1))
    assert env.pipeline.run(env.item("first")).state == MediaState.STORED
    # Two attempts before, each ended with a record (a retry): nothing can be waiting.
    assert env.pipeline.run(env.item("retried", attempts=2)).state == MediaState.STORED
    assert heads == []


def test_rows_not_yet_due_are_not_claimed(env: Env) -> None:
    item_id = env.item("m7", next_attempt_at=env.clock() + timedelta(minutes=5))
    assert env.pipeline.run(item_id).outcome == "skipped"
    assert env.provider.calls == []


def test_the_claim_leaves_a_row_that_keeps_killing_workers_to_the_reconciler(env: Env) -> None:
    item_id = env.item(
        "m8",
        state=MediaState.DOWNLOADING,
        lease_losses=env.settings.max_lease_losses - 1,
        lease_until=env.clock() - timedelta(seconds=1),
        lease_owner="dead-worker",
    )
    assert env.pipeline.run(item_id).outcome == "skipped"


def test_taking_over_a_lapsed_lease_counts_one_loss_and_many_attempts_do_not(
    env: Env,
) -> None:
    env.provider.add("m9", jpeg())
    item_id = env.item(
        "m9",
        state=MediaState.DOWNLOADING,
        attempts=40,
        lease_until=env.clock() - timedelta(seconds=1),
        lease_owner="dead-worker",
    )
    assert env.pipeline.run(item_id).state == MediaState.STORED
    row = env.row(item_id)
    assert (row.attempts, row.lease_losses) == (41, 1)
    # A row claimed from pending has lost no lease.
    env.provider.add("m10", jpeg())
    fresh_id = env.item("m10")
    env.pipeline.run(fresh_id)
    assert env.row(fresh_id).lease_losses == 0


# --- the outcome table, as the pipeline applies it --------------------------------------


def test_400_is_never_retried(env: Env) -> None:
    env.provider.add("bad", jpeg())
    env.provider.lookup_errors.append(ProviderRejected("400", endpoint="lookup", status=400))
    item_id = env.item("bad", fresh=False)
    result = env.pipeline.run(item_id)
    assert (result.state, result.reason) == ("failed", "provider_rejected")
    row = env.row(item_id)
    assert row.failure_reason == "provider_rejected" and "400" in (row.last_error or "")
    env.clock.advance(7200)
    assert env.pipeline.run(item_id).outcome == "skipped"
    assert env.provider.calls == [("lookup", "bad")]


def test_401_from_the_lookup_disconnects_the_instance_and_retries_later(env: Env) -> None:
    env.provider.add("auth", jpeg())
    env.provider.lookup_errors.append(ProviderAuthError("401", endpoint="lookup", status=401))
    item_id = env.item("auth", fresh=False)
    result = env.pipeline.run(item_id)
    assert (result.outcome, result.state) == ("instance_unauthorized", "pending")
    assert result.next_attempt_at is not None and result.next_attempt_at > env.clock()
    with env.sessions() as session:
        instance = session.get(Instance, env.instance_id)
        assert instance is not None and not instance.connected
    # While disconnected no call is made and the attempt is given back.
    env.make_due(item_id)
    attempts = env.row(item_id).attempts
    assert env.pipeline.run(item_id).outcome == "instance_disconnected"
    assert env.row(item_id).attempts == attempts
    assert env.provider.count("lookup") == 1
    # The operator reconnects: the row is stored.
    with env.sessions.begin() as session:
        instance = session.get(Instance, env.instance_id)
        assert instance is not None
        instance.connected = True
    env.make_due(item_id)
    assert env.pipeline.run(item_id).outcome == "stored"


def _disconnects_counted(provider: str, reason: str) -> float:
    for family in metrics.INSTANCE_DISCONNECTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {
                "provider": provider,
                "reason": reason,
            }:
                return sample.value
    return 0.0


def test_an_automatic_disconnect_is_loud_recorded_and_counted(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    for media_id in ("auth-1", "auth-2"):
        env.provider.add(media_id, jpeg())
        env.provider.lookup_errors.append(
            ProviderAuthError("Invalid OAuth access token", endpoint="lookup", status=401)
        )
    first, second = env.item("auth-1", fresh=False), env.item("auth-2", fresh=False)
    counted = _disconnects_counted("cloud", "instance_unauthorized")
    with caplog.at_level(logging.INFO, logger="ingest.pipeline"):
        env.pipeline.run(first)
        # A second 401 in flight when the first disconnected the instance changes nothing.
        with env.sessions.begin() as session:
            session.execute(
                update(Instance).where(Instance.id == env.instance_id).values(connected=True)
            )
        env.pipeline.run(second)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per transition from connected to disconnected
    message = warnings[0].getMessage()
    assert "disconnected" in message and "instance_unauthorized" in message
    assert "HTTP 401" in message
    with env.sessions() as session:
        instance = session.get(Instance, env.instance_id)
        assert instance is not None and not instance.connected
        assert instance.disconnected_reason is not None
        assert instance.disconnected_reason.startswith("instance_unauthorized: lookup HTTP 401")
        assert instance.disconnected_at == env.clock()
    assert _disconnects_counted("cloud", "instance_unauthorized") == counted + 2


def test_an_instance_already_disconnected_is_not_disconnected_again(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows claimed before the disconnect finish their 401s later: one warning is enough."""
    env.provider.add("auth", jpeg())
    env.provider.lookup_errors.append(ProviderAuthError("401", endpoint="lookup", status=401))
    item_id = env.item("auth", fresh=False)
    with env.sessions.begin() as session:
        session.execute(
            update(Instance)
            .where(Instance.id == env.instance_id)
            .values(connected=False, disconnected_reason="operator", disconnected_at=utcnow())
        )
    # Claimed as connected (the row was read before the operator's change).
    real_claim = env.pipeline.claim_many

    def claim_as_connected(*args: Any, **kwargs: Any) -> Any:
        return [replace(work, connected=True) for work in real_claim(*args, **kwargs)]

    env.pipeline.claim_many = claim_as_connected  # type: ignore[method-assign]
    counted = _disconnects_counted("cloud", "instance_unauthorized")
    with caplog.at_level(logging.WARNING, logger="ingest.pipeline"):
        assert env.pipeline.run(item_id).outcome == "instance_unauthorized"
    assert not [r for r in caplog.records if "disconnected" in r.getMessage()]
    with env.sessions() as session:
        instance = session.get(Instance, env.instance_id)
        assert instance is not None and instance.disconnected_reason == "operator"
    assert _disconnects_counted("cloud", "instance_unauthorized") == counted


def test_404_from_the_lookup_after_the_url_went_stale_fails(env: Env) -> None:
    env.provider.lookup_errors.append(MediaNotFound("404", endpoint="lookup", status=404))
    item_id = env.item("gone", fresh=False)
    result = env.pipeline.run(item_id)
    assert (result.state, result.reason) == ("failed", "media_not_found")


@pytest.mark.parametrize(
    "error",
    [
        ProviderThrottled("429", endpoint="lookup", status=429, retry_after=90),
        ProviderUnavailable("503", endpoint="lookup", status=503),
        ProviderUnavailable("timed out", endpoint="lookup", counts_against_budget=False),
    ],
)
def test_throttling_and_outages_back_off_in_sql(env: Env, error: ProviderError) -> None:
    env.provider.add("busy", jpeg())
    env.provider.lookup_errors.append(error)
    item_id = env.item("busy", fresh=False)
    result = env.pipeline.run(item_id)
    assert result.state == "pending"
    row = env.row(item_id)
    assert row.next_attempt_at > env.clock() and row.lease_owner is None
    if error.retry_after:
        assert row.next_attempt_at >= env.clock() + timedelta(seconds=error.retry_after)
    env.make_due(item_id)
    assert env.pipeline.run(item_id).outcome == "stored"
    assert env.row(item_id).attempts == 2


def test_retries_give_up_as_expired_when_the_seven_days_pass(env: Env) -> None:
    env.provider.lookup_errors.append(ProviderUnavailable("503", endpoint="lookup", status=503))
    item_id = env.item("late", fresh=False, expires_at=env.clock() + timedelta(seconds=2))
    result = env.pipeline.run(item_id)
    assert result.state == "expired"
    assert env.row(item_id).download_url is None


def test_an_item_past_its_seven_days_is_expired_without_a_call(env: Env) -> None:
    item_id = env.item("old", fresh=False, expires_at=env.clock() - timedelta(seconds=1))
    assert env.pipeline.run(item_id).state == "expired"
    assert env.provider.calls == []


def test_storage_failure_is_retried_and_nothing_is_recorded_as_stored(env: Env) -> None:
    class BrokenStorage(MemoryStorage):
        def put(self, *args: Any, **kwargs: Any) -> Any:
            raise StorageError("s3 put failed: SlowDown")

    env.pipeline.storage = BrokenStorage()
    env.provider.add("m9", jpeg())
    item_id = env.item("m9")
    result = env.pipeline.run(item_id)
    assert (result.outcome, result.state) == ("storage_unavailable", "pending")
    assert env.row(item_id).storage_key is None


@contextmanager
def database_down_for(env: Env, writes: int, marker: str) -> Iterator[list[str]]:
    """The next ``writes`` UPDATEs whose SQL contains ``marker`` fail as a database that went
    away would (OperationalError); later ones go through."""
    from sqlalchemy.exc import OperationalError

    engine = env.sessions.kw["bind"]
    failed: list[str] = []

    def refuse(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if marker in statement and len(failed) < writes:
            failed.append(statement)
            raise OperationalError(statement, {}, Exception("server closed the connection"))

    event.listen(engine, "before_cursor_execute", refuse)
    try:
        yield failed
    finally:
        event.remove(engine, "before_cursor_execute", refuse)


def test_a_copy_is_recorded_once_the_database_is_back_not_after_the_lease(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL restarted while the upload ran: the verified copy is recorded as soon as
    the database answers, instead of the row waiting a whole lease in `downloading`."""
    monkeypatch.setattr(time, "sleep", lambda _seconds: None)  # tenacity's waits
    env.provider.add("blip", jpeg())
    item_id = env.item("blip")
    with database_down_for(env, 3, "stored_at") as failed:
        result = env.pipeline.run(item_id)
    assert len(failed) == 3
    assert (result.outcome, env.row(item_id).state) == ("stored", "stored")


def test_a_retry_decision_is_recorded_once_the_database_is_back(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "sleep", lambda _seconds: None)
    env.provider.add("later", jpeg())
    env.provider.download_errors.append(ProviderUnavailable("503", endpoint="download", status=503))
    item_id = env.item("later")
    with database_down_for(env, 2, "last_error") as failed:
        result = env.pipeline.run(item_id)
    assert len(failed) == 2
    row = env.row(item_id)
    assert (result.state, row.state, row.lease_owner) == ("pending", "pending", None)


def _failing_storage() -> MemoryStorage:
    class BrokenStorage(MemoryStorage):
        puts = 0
        healthy = False

        def put(self, *args: Any, **kwargs: Any) -> Any:
            type(self).puts += 1
            if not self.healthy:
                raise StorageError("s3 put failed: ServiceUnavailable")
            return super().put(*args, **kwargs)

        def check(self) -> None:
            if not self.healthy:
                raise StorageError("s3 bucket is not reachable")

    return BrokenStorage()


def test_a_failing_store_pauses_downloads_until_a_probe_finds_it_back(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """Items downloaded while S3 is down are thrown away: after a few failed uploads the
    pipeline stops claiming (no provider call at all) until the store answers again."""
    env = build_env(
        settings.model_copy(
            update={"storage_breaker_failures": 2, "storage_breaker_reset_seconds": 0.05}
        ),
        sessions,
    )
    storage = _failing_storage()
    env.pipeline = Pipeline(
        settings=env.settings,
        sessions=sessions,
        storage=storage,
        budget=env.budget,
        clients=env.provider.client,
        clock=env.clock,
        rng=random.Random(0),
        monotonic=env.clock.monotonic,
    )
    items = media_rows_of(env, "s", 5)

    results = [env.pipeline.run(item_id) for item_id in items]

    assert [r.outcome for r in results[:2]] == ["storage_unavailable"] * 2
    assert [(r.outcome, r.reason) for r in results[2:]] == [("skipped", "storage_paused")] * 3
    assert env.provider.count("download") == 2  # nothing fetched while paused
    paused = env.row(items[4])
    assert (paused.state, paused.attempts) == ("pending", 0)
    assert paused.next_attempt_at > env.clock()  # deferred, woken again by the reconciler

    time.sleep(0.1)  # the breaker's pause passes; the store is still down: stays paused
    assert env.pipeline.run(items[4]).reason == "storage_paused"
    storage.healthy = True  # type: ignore[attr-defined]
    time.sleep(0.1)
    env.make_due(items[4])
    assert env.pipeline.run(items[4]).outcome == "stored"


def test_abandoning_hands_the_row_lease_and_budget_slot_back_at_once(env: Env) -> None:
    env.provider.add("big", jpeg(8 * CHUNK))
    item_id = env.item("big")
    limits = [BudgetLimit(f"media:{env.phone_number_id()}", 19)]
    held: list[int] = []

    def stop_mid_transfer(index: int) -> None:
        if index == 2:
            held.append(count_events(env.sessions, limits[0].key))
            assert env.pipeline.abandon_all() == 1

    env.provider.on_chunk = stop_mid_transfer
    result = env.pipeline.run(item_id)

    assert (result.outcome, result.reason) == ("skipped", "abandoned")
    row = env.row(item_id)
    assert (row.state, row.lease_owner, row.lease_until, row.attempts) == (
        "pending",
        None,
        None,
        0,
    )
    assert row.next_attempt_at <= env.clock() and row.enqueued_at is None
    assert held == [1] and count_events(env.sessions, limits[0].key) == 0
    assert env.storage.keys() == []
    # A stopping worker takes nothing new.
    assert env.pipeline.run(env.item("other")).reason == "abandoned"


def test_the_rows_of_one_wake_up_are_claimed_in_one_statement_and_each_stored(
    env: Env,
) -> None:
    items = media_rows_of(env, "b", 4)

    with media_updates(env) as updates:
        results = env.pipeline.run_many(items)

    assert [r.outcome for r in results] == ["stored"] * 4
    assert [r.item_id for r in results] == items
    claims = [s for s in updates if "SET state" in s and "attempts" in s.split("WHERE")[0]]
    assert len(claims) == 1
    # The four copies are recorded together: one batched write, not one a row.
    records = [s for s in updates if "storage_key" in s.split("WHERE")[0]]
    assert len(records) == 1
    assert all(stored_bytes(env, item) == jpeg(seed=n) for n, item in enumerate(items))
    assert all(env.row(item).state == MediaState.STORED for item in items)


def test_a_copy_that_has_waited_the_recording_bound_is_recorded_while_its_message_still_runs(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow, quick = slow_and_quick_rows(env)
    quick_while_slow_ran: list[str] = []

    def hold_the_slow_transfer(index: int) -> None:
        if index == 2:  # only the slow transfer has a third chunk
            quick_while_slow_ran.append(wait_for_state(env, quick, MediaState.STORED))

    env.provider.on_chunk = hold_the_slow_transfer
    monkeypatch.setattr(pipeline_module, "RECORD_WITHIN_SECONDS", 0.0)

    results = env.pipeline.run_many([slow, quick])

    # The rows ran side by side (the quick one did not wait behind the slow one's transfer),
    # and its copy was recorded while the slow one was still downloading.
    assert quick_while_slow_ran == ["stored"]
    assert [r.outcome for r in results] == ["stored", "stored"]


def slow_and_quick_rows(env: Env) -> tuple[int, int]:
    """Two due rows: one whose body has four chunks (only its transfer reaches chunk 2, where a
    test can hold it) and one of a single chunk."""
    env.provider.add("quick", jpeg())
    env.provider.add("slow", jpeg(4 * CHUNK, seed=1))
    return env.item("slow"), env.item("quick")


def wait_for_state(env: Env, item_id: int, state: str) -> str:
    """The row's state once it is ``state``, or whatever it is after :func:`wait_for`'s bound."""
    wait_for(lambda: env.row(item_id).state == state)
    return env.row(item_id).state


def test_a_process_runs_no_more_rows_at_once_than_it_has_row_slots(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    env = build_env(settings, sessions, row_slots=2)
    items = media_rows_of(env, "c", 6)
    lock = threading.Lock()
    running, most = 0, 0
    # Two transfers must be in flight together to pass (a process with one slot would break
    # the barrier), and a third would show in ``most``.
    pairs = threading.Barrier(2, timeout=10)

    def count(index: int) -> None:
        nonlocal running, most
        if index == 0:  # a transfer's first chunk; each body is one chunk
            with lock:
                running += 1
                most = max(most, running)
            pairs.wait()
            time.sleep(0.05)  # room for a third to start, if it could
        else:
            with lock:
                running -= 1

    env.provider.on_chunk = count
    # Two messages at once, as two of the process's Celery threads would run them.
    with ThreadPoolExecutor(2) as messages:
        outcomes = list(messages.map(env.pipeline.run_many, [items[:3], items[3:]]))

    assert [r.outcome for batch in outcomes for r in batch] == ["stored"] * 6
    assert most == 2


def test_a_record_that_fails_mid_message_leaves_no_row_of_it_running_unowned(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow, quick = slow_and_quick_rows(env)
    finishing = env.pipeline.finishing
    record = finishing.stored_many
    calls = 0

    def first_record_fails(*args: Any, **kwargs: Any) -> set[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the database went away for longer than the write waits")
        return record(*args, **kwargs)

    monkeypatch.setattr(finishing, "stored_many", first_record_fails)

    def hold_the_slow_transfer(index: int) -> None:
        if index == 2:  # only the slow transfer has a third chunk
            wait_for(lambda: calls >= 1)  # the quick copy's record has failed

    env.provider.on_chunk = hold_the_slow_transfer
    monkeypatch.setattr(pipeline_module, "RECORD_WITHIN_SECONDS", 0.0)

    with pytest.raises(RuntimeError):
        env.pipeline.run_many([slow, quick])

    # The error rose only once the slow row had ended, and that row was recorded: nothing of
    # the message was left running with nobody to record it.
    assert env.row(slow).state == MediaState.STORED
    # The quick copy is in storage, its row left to its next attempt (which finds it there).
    assert env.row(quick).state == MediaState.DOWNLOADING
    assert env.storage.keys() and len(env.storage.keys()) == 2


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Until ``condition()`` holds, or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_row_whose_lease_was_lost_does_not_cost_the_others_of_its_batch_their_record(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    items = media_rows_of(env, "l", 3)
    taken = items[1]

    class TakenDuringItsUpload(MemoryStorage):
        def put(self, key: str, *args: Any, **kwargs: Any) -> Any:
            stored = super().put(key, *args, **kwargs)
            if "l1" in key:  # another worker takes this row over meanwhile
                with env.sessions.begin() as session:
                    session.execute(
                        update(MediaItem)
                        .where(MediaItem.id == taken)
                        .values(lease_owner="another-worker")
                    )
            return stored

    env.pipeline.storage = TakenDuringItsUpload()

    results = env.pipeline.run_many(items)

    assert [(r.outcome, r.reason) for r in results] == [
        ("stored", None),
        ("skipped", "lease_lost"),
        ("stored", None),
    ]
    assert [env.row(item).state for item in items] == ["stored", "downloading", "stored"]
    assert env.row(taken).lease_owner == "another-worker"
    assert "lost its lease before recording the copy" in caplog.text


def test_a_stopping_worker_records_the_copies_waiting_for_their_message_and_hands_back_the_rest(
    settings: Settings, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = build_env(settings, sessions, row_slots=1)  # the rows in turn: one is done first
    # The first copy waits for its message's record however slow this machine is.
    monkeypatch.setattr(pipeline_module, "RECORD_WITHIN_SECONDS", 60.0)
    env.provider.add("done", jpeg())
    env.provider.add("slow", jpeg(4 * CHUNK, seed=1))
    items = [env.item("done"), env.item("slow")]

    first_row_when_abandoned: list[str] = []

    def stop_during_the_second_transfer(index: int) -> None:
        if index == 1 and env.provider.count("download") == 2:
            assert env.pipeline.abandon_all() == 1  # the one in flight
            # Recorded by then: the process may exit right after (its thread blocked in a read).
            first_row_when_abandoned.append(env.row(items[0]).state)

    env.provider.on_chunk = stop_during_the_second_transfer
    results = env.pipeline.run_many(items)

    assert first_row_when_abandoned == ["stored"]

    assert [(r.outcome, r.reason) for r in results] == [
        ("skipped", "abandoned"),  # recorded and counted by abandon_all
        ("skipped", "abandoned"),
    ]
    done, slow = (env.row(item) for item in items)
    assert (done.state, done.storage_key is not None) == ("stored", True)
    assert (slow.state, slow.lease_owner) == ("pending", None)


def test_a_row_whose_attempt_raised_costs_the_others_of_its_message_nothing(env: Env) -> None:
    items = media_rows_of(env, "r", 3)  # one chunk each
    env.provider.add("broken", jpeg(2 * CHUNK, seed=9))
    broken = env.item("broken")

    def break_its_transfer(index: int) -> None:
        if index == 2:  # only the broken row's body has two chunks
            raise RuntimeError("a bug in one row's attempt")

    env.provider.on_chunk = break_its_transfer

    with pytest.raises(RuntimeError):
        env.pipeline.run_many([items[0], broken, *items[1:]])

    # The rows around it still ran, and their copies were recorded before the error rose.
    assert [env.row(item).state for item in items] == ["stored"] * 3


def test_rows_of_a_wake_up_not_ours_to_take_are_skipped_and_the_others_run(env: Env) -> None:
    env.provider.add("due", jpeg())
    due = env.item("due")
    later = env.item("later", next_attempt_at=env.clock() + timedelta(hours=1))
    leased = env.item(
        "leased",
        state=MediaState.DOWNLOADING,
        lease_owner="another-worker",
        lease_until=env.clock() + timedelta(minutes=5),
    )

    results = env.pipeline.run_many([later, due, leased])

    assert [(r.item_id, r.outcome) for r in results] == [
        (later, "skipped"),
        (due, "stored"),
        (leased, "skipped"),
    ]
    assert env.row(leased).lease_owner == "another-worker"
    assert env.row(later).attempts == 0


def test_a_stopping_worker_hands_back_the_rows_it_claimed_but_had_not_started(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    env = build_env(settings, sessions, row_slots=1)  # the two others wait for the slot
    env.provider.add("first", jpeg(4 * CHUNK))
    items = [env.item("first"), env.item("second"), env.item("third")]

    def stop_mid_transfer(index: int) -> None:
        if index == 1:
            assert env.pipeline.abandon_all() == 3  # one in flight, two queued

    env.provider.on_chunk = stop_mid_transfer
    results = env.pipeline.run_many(items)

    assert [(r.outcome, r.reason) for r in results] == [("skipped", "abandoned")] * 3
    for item_id in items:
        row = env.row(item_id)
        assert (row.state, row.lease_owner, row.attempts, row.enqueued_at) == (
            "pending",
            None,
            0,
            None,
        )
    assert env.provider.count("download") == 1
    assert env.storage.keys() == []


def test_a_queued_row_renews_its_lease_a_third_of_a_lease_after_its_claim(env: Env) -> None:
    """The lease of a row waiting behind another runs from the claim: one that waited two
    thirds of its lease renews it at once when it starts, not a third of a lease later."""
    interval = env.settings.lease_seconds / 3
    item_id = env.item("queued")
    [work] = env.pipeline.claim_many([item_id])
    claimed_until = env.row(item_id).lease_until
    in_flight = env.pipeline.in_flight

    with in_flight.queueing([work]):
        env.clock.advance(interval * 2)
        with in_flight.tracking(work, env.provider.client(work.credentials)) as attempt:
            in_flight.keep_lease(attempt, "starting")

    renewed_until = env.row(item_id).lease_until
    assert claimed_until is not None and renewed_until is not None
    assert renewed_until - claimed_until == timedelta(seconds=interval * 2)


def test_a_long_download_keeps_its_budget_slot_past_the_in_flight_bound(env: Env) -> None:
    env.provider.add("long", jpeg(6 * CHUNK))
    item_id = env.item("long")
    key = f"media:{env.phone_number_id()}"
    ttl = in_flight_ttl(env.settings)
    others: list[str] = []

    def slow_link(index: int) -> None:
        env.clock.advance(ttl * 0.4)  # 2.4 bounds in all: only renewals keep the slot
        if index == 5:
            try:
                env.budget.reserve([BudgetLimit(key, 1)])
                others.append("reserved")
            except BudgetExhausted:
                others.append("refused")

    env.provider.on_chunk = slow_link
    assert env.pipeline.run(item_id).outcome == "stored"
    assert others == ["refused"]  # the live transfer still held the number's only slot
    assert count_events(env.sessions, key) == 0


# --- integrity: nothing unverified is stored ---------------------------------------------


def test_a_checksum_mismatch_is_retried_with_a_fresh_url(env: Env) -> None:
    body = jpeg()
    env.provider.add("flaky", body)
    env.provider.corrupt_downloads = 1
    item_id = env.item("flaky", declared_sha256=hashlib.sha256(body).hexdigest())
    assert env.pipeline.run(item_id).outcome == "stored"
    assert env.provider.calls == [
        ("download", "webhook"),
        ("lookup", "flaky"),
        ("download", "fresh"),
    ]
    assert stored_bytes(env, item_id) == body


def test_a_persistent_checksum_mismatch_fails_and_is_never_stored(env: Env) -> None:
    env.provider.add("corrupt", jpeg(), sha256="ab" * 32)
    item_id = env.item("corrupt", fresh=False)
    result = env.pipeline.run(item_id)
    assert (result.state, result.reason) == ("failed", "checksum_mismatch")
    assert env.storage.keys() == []
    assert env.provider.count("download") == 2
    assert env.row(item_id).actual_sha256 is None


def test_bytes_that_contradict_the_declared_type_fail_as_unsupported(env: Env) -> None:
    env.provider.add("png", PNG, mime="image/jpeg")
    item_id = env.item("png")
    result = env.pipeline.run(item_id)
    assert (result.state, result.reason) == ("failed", "unsupported_type")
    assert env.storage.keys() == []


def test_an_html_error_page_served_as_media_is_never_stored(env: Env) -> None:
    env.provider.add("html", b"<!DOCTYPE html><html>Session expired</html>", mime="video/mp4")
    item_id = env.item("html", media_type="video", declared_mime="video/mp4")
    assert env.pipeline.run(item_id).reason == "unsupported_type"
    assert env.storage.keys() == []


def test_a_stream_past_the_cap_is_aborted_at_the_cap(
    make_settings: Any, database_url: str, sessions: sessionmaker[Session]
) -> None:
    settings = make_settings(database_url=database_url, max_media_bytes=4 * CHUNK)
    env = build_env(settings, sessions)
    env.provider.add("huge", jpeg(40 * CHUNK), mime="image/jpeg", file_size=None)
    env.provider.media["huge"].file_size = None
    item_id = env.item("huge")
    result = env.pipeline.run(item_id)
    assert (result.state, result.reason) == ("failed", "too_large")
    assert env.provider.max_bytes_seen == [4 * CHUNK]
    assert env.provider.chunks_served <= 4  # stopped reading at the cap, not at the end
    assert env.storage.keys() == []


def test_the_cap_is_also_the_size_the_lookup_stated(env: Env) -> None:
    env.provider.add("liar", jpeg(10 * CHUNK), file_size=2 * CHUNK)
    item_id = env.item("liar", fresh=False)
    assert env.pipeline.run(item_id).reason == "too_large"
    assert env.provider.max_bytes_seen == [2 * CHUNK]


# --- the error budget --------------------------------------------------------------------


def test_a_spent_budget_blocks_the_number_without_calling_and_without_an_attempt(
    env: Env,
) -> None:
    env.provider.add("blocked", jpeg())
    with env.sessions() as session:
        instance = session.get(Instance, env.instance_id)
        assert instance is not None
        phone = instance.phone_number_id
    limit = [BudgetLimit(f"media:{phone}", env.settings.error_budget_media)]
    for _ in range(env.settings.error_budget_media):
        env.budget.confirm(env.budget.reserve(limit))
    item_id = env.item("blocked")
    result = env.pipeline.run(item_id)
    assert (result.outcome, result.state) == ("budget_exhausted", "pending")
    assert env.provider.calls == []
    row = env.row(item_id)
    assert row.attempts == 0
    window = timedelta(seconds=env.settings.error_budget_window_seconds)
    assert row.next_attempt_at >= env.clock() + window - timedelta(seconds=5)
    # When the window frees, the number resumes.
    env.make_due(item_id)
    assert env.pipeline.run(item_id).outcome == "stored"


def test_errors_of_one_number_never_exceed_its_budget_and_others_keep_flowing(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    env = build_env(settings, sessions, provider=Provider.D360)
    with sessions.begin() as session:
        healthy_id = make_instance(session).id
    # Every lookup for the 360dialog number fails; the healthy number's items need none.
    env.provider.lookup_errors.extend(
        ProviderUnavailable("503", endpoint="lookup", status=503) for _ in range(30)
    )
    failing = [env.item(f"f{n}", fresh=False) for n in range(30)]
    healthy = []
    for n in range(5):
        env.provider.add(f"h{n}", jpeg(seed=n))
        healthy.append(env.item(f"h{n}", instance_id=healthy_id))
    for item_id in failing + healthy:
        env.pipeline.run(item_id)
    # 360dialog: at most error_budget_lookup_360dialog failed lookups, then no more calls.
    assert env.provider.count("lookup") == env.settings.error_budget_lookup_360dialog
    assert all(env.row(i).state == MediaState.STORED for i in healthy)
    assert all(env.row(i).state == MediaState.PENDING for i in failing)


def test_the_signed_url_never_appears_in_logs_or_errors(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env.provider.add("s1", jpeg())
    env.provider.download_errors.append(
        UrlRejected("cdn said 403", endpoint="download", status=403)
    )
    env.provider.download_errors.append(
        UrlRejected("cdn said 403", endpoint="download", status=403)
    )
    item_id = env.item("s1")
    result = env.pipeline.run(item_id)
    assert result.state == "pending"
    row = env.row(item_id)
    assert row.download_url is None  # used once: not kept
    assert SIGNATURE not in (row.last_error or "")
    assert SIGNATURE not in caplog.text and "cdn.test" not in caplog.text
    line = next(r.getMessage() for r in caplog.records if "outcome=url_rejected" in r.getMessage())
    assert f"item={item_id}" in line and "instance=instance-" in line and "duration=" in line


# --- against the sandbox provider (real HTTP clients, in-process pipeline) ----------------


@dataclass
class SandboxEnv:
    settings: Settings
    sessions: sessionmaker[Session]
    sandbox: Any
    storage: MemoryStorage
    pipeline: Pipeline
    egress: Any

    def number(self, provider: str = "cloud") -> int:
        with self.sessions.begin() as session:
            instance = make_instance(session, provider=Provider(provider))
            self.sandbox.add_number(instance.phone_number_id, instance.api_key, provider)
            return instance.id

    def item(
        self, instance_id: int, media_type: str = "image", *, stale: bool = True, **media: Any
    ) -> tuple[int, Any]:
        with self.sessions.begin() as session:
            instance = session.get(Instance, instance_id)
            assert instance is not None
            found = self.sandbox.add_media(instance.phone_number_id, media_type, **media)
            now = utcnow()
            received = now - timedelta(minutes=10) if stale else now
            row = make_media_item(
                session,
                instance,
                media_id=found.media_id,
                media_type=media_type,
                declared_mime=found.mime_type,
                declared_sha256=found.sha256,
                received_at=received,
                next_attempt_at=received,
                download_url=found.url,
                url_deadline=received + timedelta(minutes=5),
            )
            return row.id, found

    def state(self, item_id: int) -> tuple[str, str | None]:
        with self.sessions() as session:
            row = session.get(MediaItem, item_id)
            assert row is not None
            return row.state, row.failure_reason

    def make_all_due(self) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(MediaItem)
                .where(MediaItem.state == MediaState.PENDING)
                .values(next_attempt_at=utcnow() - timedelta(seconds=1))
            )


@pytest.fixture
def build_sandbox_env(
    sandbox: Any, make_settings: Any, sqlite_url: str, session_factory_for: Any
) -> Iterator[Callable[..., SandboxEnv]]:
    """SQLite only: the database rules are covered above on both backends."""
    from ingest.egress import Egress
    from ingest.providers import client_for

    def build(**overrides: Any) -> SandboxEnv:
        settings = make_settings(
            database_url=sqlite_url,
            graph_url=sandbox.graph_url,
            d360_url=sandbox.d360_url,
            media_hosts=sandbox.media_hosts,
            http_timeout_seconds=5.0,
            **overrides,
        )
        sessions = session_factory_for(sqlite_url)
        egress = Egress(settings)
        egresses.append(egress)
        storage = MemoryStorage()
        pipeline = Pipeline(
            settings=settings,
            sessions=sessions,
            storage=storage,
            budget=SqlErrorBudget.from_settings(sessions, settings),
            clients=lambda credentials: client_for(credentials, settings, egress),
            rng=random.Random(0),
        )
        return SandboxEnv(settings, sessions, sandbox, storage, pipeline, egress)

    egresses: list[Any] = []
    yield build
    for egress in egresses:
        egress.close()


@pytest.fixture
def sandbox_env(build_sandbox_env: Callable[..., SandboxEnv]) -> SandboxEnv:
    return build_sandbox_env()


def test_sandbox_stale_url_costs_exactly_one_lookup(sandbox_env: SandboxEnv) -> None:
    instance_id = sandbox_env.number()
    item_id, found = sandbox_env.item(instance_id)
    result = sandbox_env.pipeline.run(item_id)
    assert result.outcome == "stored", sandbox_env.state(item_id)
    assert sandbox_env.sandbox.requests("graph_lookup") == 1
    assert sandbox_env.sandbox.requests("cdn_download") == 1
    with sandbox_env.pipeline.sessions() as session:
        row = session.get(MediaItem, item_id)
        assert row is not None and row.storage_key is not None
    with sandbox_env.storage.open(row.storage_key) as stored:
        assert stored.read() == sandbox_env.sandbox.media_bytes(found.media_id)


def test_sandbox_fresh_url_needs_no_lookup(sandbox_env: SandboxEnv) -> None:
    instance_id = sandbox_env.number("360dialog")
    item_id, _ = sandbox_env.item(instance_id, "document", stale=False)
    assert sandbox_env.pipeline.run(item_id).outcome == "stored"
    assert sandbox_env.sandbox.requests("d360_lookup") == 0
    assert sandbox_env.sandbox.requests("d360_download") == 1


def test_sandbox_400_is_never_retried(sandbox_env: SandboxEnv) -> None:
    instance_id = sandbox_env.number()
    item_id, found = sandbox_env.item(instance_id)
    sandbox_env.sandbox.set_faults(found.media_id, lookup_statuses=[400, 400, 400])
    assert sandbox_env.pipeline.run(item_id).reason == "provider_rejected"
    sandbox_env.make_all_due()
    assert sandbox_env.pipeline.run(item_id).outcome == "skipped"
    assert sandbox_env.sandbox.requests("graph_lookup") == 1


def test_sandbox_checksum_mismatch_is_never_stored(sandbox_env: SandboxEnv) -> None:
    instance_id = sandbox_env.number()
    item_id, found = sandbox_env.item(instance_id)
    sandbox_env.sandbox.set_faults(found.media_id, corrupt=True)
    assert sandbox_env.pipeline.run(item_id).reason == "checksum_mismatch"
    assert sandbox_env.sandbox.requests("cdn_download") == 2  # once more with a fresh URL
    assert sandbox_env.storage.keys() == []


def test_sandbox_oversized_stream_is_aborted_at_the_cap(
    build_sandbox_env: Callable[..., SandboxEnv],
) -> None:
    small = build_sandbox_env(max_media_bytes=256 * 1024)
    instance_id = small.number()
    item_id, _ = small.item(instance_id, "document", size=2 * 1024 * 1024)
    assert small.pipeline.run(item_id).reason == "too_large"
    assert small.storage.keys() == []


def test_sandbox_a_failing_number_never_exceeds_its_budget_and_others_still_flow(
    sandbox_env: SandboxEnv,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    failing_id = sandbox_env.number()
    healthy_id = sandbox_env.number()
    failing = []
    for _ in range(30):
        item_id, found = sandbox_env.item(failing_id)
        sandbox_env.sandbox.set_faults(found.media_id, lookup_statuses=[500] * 10)
        failing.append(item_id)
    healthy = [sandbox_env.item(healthy_id)[0] for _ in range(6)]
    with sandbox_env.sessions() as session:
        phone = session.get(Instance, failing_id).phone_number_id  # type: ignore[union-attr]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):  # backoff "passes": every failing row is tried again
            list(pool.map(sandbox_env.pipeline.run, failing + healthy))
            sandbox_env.make_all_due()

    assert (
        sandbox_env.sandbox.max_errors_in_window(phone) <= sandbox_env.settings.error_budget_media
    )
    assert all(e.status != 429 for e in sandbox_env.sandbox.errors_served(phone))  # never blocked
    assert all(sandbox_env.state(i) == ("stored", None) for i in healthy)
    assert all(sandbox_env.state(i)[0] == "pending" for i in failing)


def test_sandbox_a_360dialog_number_never_gets_its_lookups_blocked(
    sandbox_env: SandboxEnv,
) -> None:
    """360dialog blocks a number's lookups for an hour after 5 failed ones (the sandbox does
    too): the stricter lookup budget stops one short, and downloads of fresh URLs go on."""
    from concurrent.futures import ThreadPoolExecutor

    number_id = sandbox_env.number("360dialog")
    failing = []
    for _ in range(12):
        item_id, found = sandbox_env.item(number_id)  # stale: every attempt needs a lookup
        sandbox_env.sandbox.set_faults(found.media_id, lookup_statuses=[500] * 10)
        failing.append(item_id)
    fresh = [sandbox_env.item(number_id, stale=False)[0] for _ in range(4)]
    with sandbox_env.sessions() as session:
        phone = session.get(Instance, number_id).phone_number_id  # type: ignore[union-attr]

    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(2):
            list(pool.map(sandbox_env.pipeline.run, failing))
            sandbox_env.make_all_due()
    list(map(sandbox_env.pipeline.run, fresh))

    served = sandbox_env.sandbox.errors_served(phone)
    failed_lookups = [e for e in served if e.endpoint == "d360_lookup"]
    assert 0 < len(failed_lookups) <= sandbox_env.settings.error_budget_lookup_360dialog
    assert all(e.status != 429 for e in served)  # never blocked
    assert sandbox_env.sandbox.provider.blocked_for(phone, "d360_lookup") is None
    assert all(sandbox_env.state(i) == ("stored", None) for i in fresh)
    assert all(sandbox_env.state(i)[0] == "pending" for i in failing)


def test_a_stored_item_records_its_time_from_receipt_to_stored(env: Env) -> None:
    from prometheus_client import REGISTRY

    def observed() -> float:
        return REGISTRY.get_sample_value("ingest_receipt_to_stored_seconds_count") or 0.0

    env.provider.add("timed", jpeg())
    item_id = env.item("timed")
    before = observed()
    assert env.pipeline.run(item_id).outcome == "stored"
    assert observed() == before + 1
