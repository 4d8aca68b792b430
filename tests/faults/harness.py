"""The fault suite's harness: one stack, one way to post webhooks, one invariant checker.

    stack = start_stack(env={"INGEST_LEASE_SECONDS": "30"})
    number = stack.add_number()
    burst = stack.post_in_background(number, stack.add_media(number, 150))
    stack.wait_rows(number, at_least=40)          # mid-burst
    ... inject the fault, clear it ...
    cleared = time.monotonic()
    assert_all_stored(stack, burst.result(), fault="...", cleared_at=cleared, bound=30)

:class:`FaultStack` runs, for one test, everything a deployment has: its own Redis (broker
and counters), a fresh database on the session's own PostgreSQL, a fresh bucket on the
session's own moto server (optionally behind a :class:`~tests.plugins.servers.TcpGate`), the
sandbox provider, gunicorn, Celery workers and beat, each a real process.

:func:`assert_all_stored` checks what every fault test must hold at the end and records the
figures (a JSON line in ``$INGEST_FAULTS_REPORT``; ``python -m tests.faults.report`` turns
them into a table)::

    INGEST_FAULTS_REPORT=/tmp/faults.jsonl .venv/bin/pytest tests/faults   # or -m faults
    .venv/bin/python -m tests.faults.report /tmp/faults.jsonl
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ingest.db import make_engine
from ingest.models import TERMINAL_STATES, Instance, MediaItem, MediaState, Provider
from ingest.secrets import generate_key
from ingest.settings import Settings
from sandbox.client import SandboxControl
from sandbox.payloads import sign, varied_message, webhook_body
from sandbox.processes import ManagedProcess, ProcessGroup
from sandbox.provider import SandboxMedia
from sandbox.registration import DemoRegistration, register
from sandbox.server import media_hosts_for
from sandbox.stacks import S3_DUMMY_CREDENTIALS, admin_client
from tests.plugins.servers import PostgresCluster, RedisServer, TcpGate

# Read at import: the suite's autouse fixture removes INGEST_* variables from the test's
# environment before each test runs.
REPORT_PATH = os.environ.get("INGEST_FAULTS_REPORT")

POLL_SECONDS = 0.25
# A provider retries an unanswered or 5xx webhook; this one retries quickly.
PROVIDER_RETRY_SECONDS = 0.5
DELIVERY_DEADLINE_SECONDS = 120.0
# How long past its bound a test keeps waiting, so a failure still reports its real figure.
GRACE_SECONDS = 10.0
# Small real media (sandbox samples padded to these sizes): bursts stay CPU-cheap.
MEDIA_MIX = (("image", 24_000), ("audio", 16_000), ("sticker", 12_000), ("image", 40_000))
# Every fault test's defaults: retries and reconciler passes on a scale of seconds.
BASE_ENV = {
    "INGEST_RECONCILE_INTERVAL_SECONDS": "2",
    "INGEST_RETRY_BASE_SECONDS": "1",
    "INGEST_RETRY_MAX_SECONDS": "4",
    "INGEST_API_RATE_LIMIT": "100000/minute",
    "INGEST_LOG_LEVEL": "INFO",
}


# --- the stack ------------------------------------------------------------------------------


@dataclass
class MotoProcess:
    """The session's moto server; :meth:`pause` is SIGSTOP (S3 stops answering, keeps state)."""

    process: subprocess.Popen[bytes]
    endpoint_url: str
    paused: bool = False

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False


@dataclass
class FaultStack:
    """One deployment for one test, every part a real process or server of its own."""

    group: ProcessGroup
    root: Path
    redis: RedisServer
    postgres: PostgresCluster
    moto: MotoProcess
    gate: TcpGate | None
    database_url: str
    bucket: str
    env: dict[str, str]
    settings: Settings
    engine: Engine
    sandbox: ManagedProcess
    control: SandboxControl
    web: ManagedProcess
    workers: list[ManagedProcess] = field(default_factory=list)
    beats: list[ManagedProcess] = field(default_factory=list)
    # Processes the test itself stopped, killed or paused: the fault, not a step by hand.
    faulted: set[int] = field(default_factory=set)

    @classmethod
    def start(
        cls,
        *,
        group: ProcessGroup,
        postgres: PostgresCluster,
        moto: MotoProcess,
        redis_binary: str,
        root: Path,
        env: Mapping[str, str] | None = None,
        workers: int = 2,
        worker_concurrency: int = 8,
        beats: int = 1,
        s3_gate: bool = False,
    ) -> FaultStack:
        """Everything up and ready: Redis, database, bucket, sandbox, web, ``workers`` workers
        (``ingest worker --processes 1``, ``worker_concurrency`` threads each), ``beats``
        beats. ``env`` is added to every process's ``INGEST_*`` variables; ``s3_gate`` puts a
        :class:`TcpGate` between the stack and S3."""
        root.mkdir(parents=True, exist_ok=True)
        redis = RedisServer(redis_binary, root / "redis").start()
        database_url = ""
        gate = None
        try:
            database_url = postgres.create_database()
            bucket = f"ingest-faults-{uuid.uuid4().hex[:12]}"
            admin = admin_client(moto.endpoint_url)
            try:
                admin.create_bucket(Bucket=bucket)
            finally:
                admin.close()
            s3_endpoint = moto.endpoint_url
            if s3_gate:
                host, port = moto.endpoint_url.removeprefix("http://").split(":")
                gate = TcpGate(host, int(port))
                s3_endpoint = gate.url
            group.env = {}
            sandbox = group.sandbox()
            assert sandbox.base_url is not None
            var_dir = root / "var"
            secret_key = generate_key()  # PostgreSQL: secrets at rest need a configured key
            group.env = {
                **BASE_ENV,
                "INGEST_VAR_DIR": str(var_dir),
                "INGEST_DATABASE_URL": database_url,
                "INGEST_SECRET_KEY": secret_key,
                "INGEST_BROKER_URL": redis.url,
                "INGEST_REDIS_URL": redis.url,
                "INGEST_STORAGE_URL": f"s3://{bucket}/media",
                "INGEST_S3_ENDPOINT_URL": s3_endpoint,
                "INGEST_GRAPH_URL": f"{sandbox.base_url}/v21.0",
                "INGEST_D360_URL": f"{sandbox.base_url}/d360",
                "INGEST_MEDIA_HOSTS": ",".join(media_hosts_for(sandbox.base_url)),
                **S3_DUMMY_CREDENTIALS,
                **(env or {}),
            }
            web = group.web(workers=2)
            stack = cls(
                group=group,
                root=root,
                redis=redis,
                postgres=postgres,
                moto=moto,
                gate=gate,
                database_url=database_url,
                bucket=bucket,
                env=group.env,
                settings=Settings(
                    var_dir=var_dir,
                    database_url=database_url,
                    broker_url="memory://",
                    storage_url=f"s3://{bucket}/media",
                    s3_endpoint_url=moto.endpoint_url,
                    secret_key=secret_key,
                ),
                engine=make_engine(database_url),
                sandbox=sandbox,
                control=SandboxControl(sandbox.base_url),
                web=web,
            )
        except BaseException:
            group.stop_all()
            if gate is not None:
                gate.stop()
            redis.close()
            if database_url:
                postgres.drop_database(database_url)
            raise
        try:
            for _ in range(workers):
                stack.start_worker(concurrency=worker_concurrency)
            for _ in range(beats):
                stack.start_beat()
        except BaseException:
            stack.close()
            raise
        return stack

    def start_worker(
        self, *, concurrency: int = 8, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """One ``ingest worker --processes 1``: its pid is the Celery worker's own. Each gets
        a node name of its own, as ``ingest worker``'s parent gives each of its children."""
        n = len(self.workers) + 1
        node = {"INGEST_WORKER_NODE_NAME": f"fault{n}-{uuid.uuid4().hex[:6]}@localhost"}
        worker = self.group.worker(
            concurrency=concurrency, processes=1, env={**node, **(env or {})}
        )
        self.workers.append(worker)
        return worker

    def start_beat(self) -> ManagedProcess:
        # Each beat keeps its schedule file in a var dir of its own.
        var_dir = self.root / f"var-beat{len(self.beats) + 1}"
        beat = self.group.beat(env={"INGEST_VAR_DIR": str(var_dir)})
        self.beats.append(beat)
        return beat

    def close(self) -> None:
        """Kill every process (the test is over: no need to wait for graceful stops), then
        drop what the stack had on the shared servers."""
        self.control.close()
        for process in self.group.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the group: children too
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=10)
        if self.gate is not None:
            self.gate.stop()
        self.engine.dispose()
        self.redis.close()
        if self.postgres.running():
            self.postgres.drop_database(self.database_url)

    def object_keys(self) -> set[str]:
        """Every key in the stack's bucket, read from the S3 server itself."""
        client = admin_client(self.moto.endpoint_url)
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            return {item["Key"] for page in pages for item in page.get("Contents", [])}
        finally:
            client.close()

    # --- faults on processes ----------------------------------------------------------------

    def kill(self, process: ManagedProcess) -> None:
        """SIGKILL the process's whole group: a crashed machine."""
        self.faulted.add(process.pid)
        process.kill()

    def signal(self, process: ManagedProcess, signum: int) -> None:
        """Send ``signum`` to the process's group (SIGTERM, SIGSTOP, SIGCONT...)."""
        self.faulted.add(process.pid)
        os.killpg(process.pid, signum)

    def worker_owning(self, lease_owner: str | None) -> ManagedProcess | None:
        """The worker whose pid is in a row's ``lease_owner`` (``host:pid:token``)."""
        if not lease_owner:
            return None
        pid = int(lease_owner.split(":")[1])
        return next((w for w in self.workers if w.pid == pid), None)

    # --- the provider -----------------------------------------------------------------------

    def add_number(self) -> DemoRegistration:
        """A new instance in the database and its phone number at the sandbox."""
        registration = register(self.settings, Provider.CLOUD)
        self.control.add_number(registration.phone_number_id, registration.api_key)
        return registration

    def add_media(
        self,
        number: DemoRegistration,
        count: int,
        *,
        kind: str | None = None,
        size: int | None = None,
    ) -> list[SandboxMedia]:
        """``count`` real media at the sandbox (small, of mixed types unless told)."""

        def one(n: int) -> SandboxMedia:
            mix_kind, mix_size = MEDIA_MIX[n % len(MEDIA_MIX)]
            return self.control.add_media(
                number.phone_number_id, kind or mix_kind, (size or mix_size) + n
            )

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(count)))

    def set_faults(self, media_id: str | None = None, **faults: Any) -> None:
        """The sandbox's faults for one media id, or (no id) for every other one."""
        payload = {"media_id": media_id, **faults} if media_id else faults
        self.control.http.post("/_sandbox/faults", json=payload).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self.control.http.get("/_sandbox/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    # --- webhooks ---------------------------------------------------------------------------

    def deliveries(
        self, number: DemoRegistration, media: Sequence[SandboxMedia], *, web: str | None = None
    ) -> list[Delivery]:
        """One signed webhook per media, as the provider would send them (to ``web``)."""
        assert number.app_secret is not None
        base = web or self.web.base_url
        out = []
        for n, item in enumerate(media):
            wamid = f"wamid.FAULT{uuid.uuid4().hex.upper()}"
            body = webhook_body(
                number.phone_number_id, varied_message(item, wamid, "15550001111", n)
            )
            headers = {
                "Content-Type": "application/json",
                "X-Hub-Signature-256": sign(body, number.app_secret),
            }
            out.append(Delivery(number, item, wamid, f"{base}/webhook", body, headers))
        return out

    def post_in_background(
        self,
        number: DemoRegistration,
        media: Sequence[SandboxMedia],
        *,
        concurrency: int = 8,
        rate: float | None = None,
        web: str | None = None,
    ) -> Burst:
        """Post one webhook per media from a thread pool (``rate``: at most so many a second)."""
        return Burst.start(
            self.deliveries(number, media, web=web), concurrency=concurrency, rate=rate
        )

    def post(
        self,
        number: DemoRegistration,
        media: Sequence[SandboxMedia],
        *,
        concurrency: int = 8,
        web: str | None = None,
    ) -> list[Delivery]:
        return self.post_in_background(number, media, concurrency=concurrency, web=web).result()

    def redeliver(
        self, deliveries: Sequence[Delivery], *, web: str | None = None
    ) -> list[Delivery]:
        """The same webhooks again (same bytes, same message ids), as the provider redelivers
        them, to ``web`` (default: the stack's web process)."""
        base = web or self.web.base_url
        again = [replace(d, url=f"{base}/webhook", answers=[]) for d in deliveries]
        return Burst.start(again).result()

    # --- rows -------------------------------------------------------------------------------

    def rows(self, wamids: Iterable[str]) -> dict[str, MediaItem]:
        """The rows of these message ids (detached, read in one query)."""
        wanted = list(wamids)
        with Session(self.engine, expire_on_commit=False) as session:
            found = session.scalars(select(MediaItem).where(MediaItem.message_id.in_(wanted)))
            return {row.message_id: row for row in found}

    def all_stored(self, deliveries: Sequence[Delivery]) -> bool:
        rows = self.rows(d.wamid for d in deliveries)
        return len(rows) == len(deliveries) and all(
            r.state == MediaState.STORED for r in rows.values()
        )

    def message_ids(self, number: DemoRegistration, state: str) -> list[str]:
        """The message ids of the number's rows in ``state``."""
        query = (
            select(MediaItem.message_id)
            .join(Instance, Instance.id == MediaItem.instance_id)
            .where(Instance.name == number.instance, MediaItem.state == state)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def count_rows(self, number: DemoRegistration, *states: str) -> int:
        query = (
            select(func.count())
            .select_from(MediaItem)
            .join(Instance, Instance.id == MediaItem.instance_id)
            .where(Instance.name == number.instance)
        )
        if states:
            query = query.where(MediaItem.state.in_(states))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def wait_rows(
        self,
        number: DemoRegistration,
        *,
        at_least: int,
        states: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> int:
        """Poll until the number has ``at_least`` rows (in ``states``, if given)."""
        count = 0

        def enough() -> bool:
            nonlocal count
            count = self.count_rows(number, *states)
            return count >= at_least

        wait_until(enough, timeout, f"{at_least} rows {'/'.join(states) or ''} for the number")
        return count


def poll(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until true or ``timeout``; a database error (mid-fault) is "not
    yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return True
        except SQLAlchemyError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """:func:`poll`, failing the test with ``what`` when it times out."""
    if not poll(condition, timeout):
        raise AssertionError(f"not reached after {timeout:.0f} s: {what}")


# --- posting webhooks -------------------------------------------------------------------------


@dataclass
class Delivery:
    """One webhook and what the service answered to each try (status, or the error name)."""

    number: DemoRegistration
    media: SandboxMedia
    wamid: str
    url: str
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    answers: list[int | str] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return bool(self.answers) and self.answers[-1] == 200

    def send(self, http: httpx.Client, not_before: float, deadline: float) -> None:
        """From ``not_before`` on, post until a 200 or a refusal; 5xx and connection errors
        are retried, as the provider does, until ``deadline``."""
        time.sleep(max(0.0, not_before - time.monotonic()))
        while True:
            try:
                status = http.post(self.url, content=self.body, headers=self.headers).status_code
                self.answers.append(status)
                if status == 200 or (status < 500 and status != 429):
                    return
            except httpx.TransportError as exc:
                self.answers.append(type(exc).__name__)
            if time.monotonic() >= deadline:
                return
            time.sleep(PROVIDER_RETRY_SECONDS)


@dataclass
class Burst:
    """Webhooks being posted from a thread pool; :meth:`result` waits for the last answer."""

    deliveries: list[Delivery]
    _pool: ThreadPoolExecutor
    _http: httpx.Client
    _futures: list[Future[None]]
    started: float

    @classmethod
    def start(
        cls,
        deliveries: list[Delivery],
        *,
        concurrency: int = 8,
        rate: float | None = None,
        deadline_seconds: float = DELIVERY_DEADLINE_SECONDS,
    ) -> Burst:
        """Post ``deliveries`` from ``concurrency`` threads, at most ``rate`` a second."""
        http = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=concurrency))
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="provider")
        started = time.monotonic()
        deadline = started + deadline_seconds
        futures = [
            pool.submit(d.send, http, started + (n / rate if rate else 0.0), deadline)
            for n, d in enumerate(deliveries)
        ]
        return cls(deliveries, pool, http, futures, started)

    def acknowledged(self) -> int:
        return sum(1 for d in self.deliveries if d.acknowledged)

    def result(self, timeout: float = DELIVERY_DEADLINE_SECONDS + 60) -> list[Delivery]:
        try:
            for future in self._futures:
                future.result(timeout=timeout)
        finally:
            self._pool.shutdown(wait=True)
            self._http.close()
        return self.deliveries


# --- the invariant checker --------------------------------------------------------------------


@dataclass
class Figures:
    """What one fault test measured; one JSON line of the report."""

    test: str
    fault: str
    webhooks: int
    acknowledged: int
    stored: int
    lost: int
    downloads: int
    downloaded_twice: int
    extra_downloads: int
    lookups: int
    recovery_seconds: float | None
    bound_seconds: float
    passed: bool
    problems: list[str]
    extra: dict[str, Any]
    at: str


def assert_all_stored(
    stack: FaultStack,
    deliveries: Sequence[Delivery],
    *,
    fault: str,
    cleared_at: float,
    bound: float,
    max_downloads: int = 1,
    max_downloads_of: Mapping[str, int] | None = None,
    max_total_downloads: int | None = None,
    max_total_lookups: int | None = None,
    checks: Sequence[tuple[str, bool]] = (),
    extra: Mapping[str, Any] | None = None,
    stored_after: Mapping[str, Sequence[str]] | None = None,
) -> Figures:
    """What every fault test asserts at the end, recorded before it is asserted.

    - every webhook was acknowledged (a 5xx is retried by the poster, as by the provider),
      and every acknowledged one has its row (no 200 without a committed row);
    - every acknowledged row ends ``stored`` within ``bound`` seconds of ``cleared_at`` (the
      ``time.monotonic()`` when the fault was cleared): the recovery time;
    - one row per message id;
    - the bucket holds exactly the stored rows' keys, and each object's sha256 is the
      sandbox media's;
    - no media was downloaded (a transfer the CDN answered with 200) more than
      ``max_downloads`` times, or ``max_downloads_of[media_id]`` for the ones named;
    - at most ``max_total_downloads`` transfers and ``max_total_lookups`` lookups in all;
    - no process of the stack died or was restarted, except those the test faulted itself;
    - every ``(description, ok)`` in ``checks`` holds.

    ``stored_after`` names groups of message ids whose last ``stored_at`` is reported as
    seconds after ``cleared_at`` (e.g. the rows that were in flight when the fault struck).
    """
    problems: list[str] = []
    acknowledged = [d for d in deliveries if d.acknowledged]
    unanswered = [d for d in deliveries if not d.acknowledged]
    if unanswered:
        problems.append(
            f"{len(unanswered)} webhook(s) never acknowledged; answers of the first: "
            f"{unanswered[0].answers[-5:]}"
        )

    wamids = [d.wamid for d in acknowledged]
    rows, finished = _wait_final(stack, wamids, cleared_at + bound + GRACE_SECONDS)
    recovery = None if finished is None else max(0.0, finished - cleared_at)
    if recovery is None:
        problems.append(f"not every row final {bound + GRACE_SECONDS:.0f} s after the fault")
    elif recovery > bound:
        problems.append(f"recovery took {recovery:.1f} s, bound {bound:.0f} s")

    without_row = [w for w in wamids if w not in rows]
    if without_row:
        problems.append(f"{len(without_row)} acknowledged webhook(s) without a row (200, no row)")
    unstored = [rows[w] for w in wamids if w in rows and rows[w].state != MediaState.STORED]
    if unstored:
        states = Counter(f"{r.state}/{r.failure_reason or r.last_error or '-'}" for r in unstored)
        problems.append(f"{len(unstored)} acknowledged row(s) not stored: {dict(states)}")
    stored = [rows[w] for w in wamids if w in rows and rows[w].state == MediaState.STORED]

    duplicates = _duplicate_message_ids(stack, {d.number.instance for d in deliveries})
    if duplicates:
        problems.append(f"message ids with more than one row: {duplicates[:5]}")

    problems += _check_objects(stack, stored, {d.wamid: d.media for d in acknowledged})

    stats = stack.stats()
    downloads = _successful(stats, "cdn_download")
    lookups = _successful(stats, "graph_lookup")
    limits = {d.media.media_id: max_downloads for d in deliveries}
    limits.update(max_downloads_of or {})
    over = {m: downloads.get(m, 0) for m, cap in limits.items() if downloads.get(m, 0) > cap}
    extra_downloads = sum(n - limits[m] for m, n in over.items())
    if over:
        problems.append(
            f"{len(over)} media downloaded more often than allowed "
            f"({extra_downloads} extra transfer(s)); e.g. {dict(list(over.items())[:3])}"
        )

    total_downloads = sum(downloads.get(m, 0) for m in limits)
    total_lookups = sum(lookups.get(m, 0) for m in limits)
    if max_total_downloads is not None and total_downloads > max_total_downloads:
        problems.append(f"{total_downloads} downloads in all, bound {max_total_downloads}")
    if max_total_lookups is not None and total_lookups > max_total_lookups:
        problems.append(f"{total_lookups} lookups in all, bound {max_total_lookups}")

    dead = [
        f"{p.name} (pid {p.pid}, exit {p.popen.returncode})"
        for p in stack.group.processes
        if p.pid not in stack.faulted and not p.alive()
    ]
    if dead:
        problems.append(f"processes died though the test did not stop them: {dead}")
    problems += [f"check failed: {what}" for what, ok in checks if not ok]

    media_ids = limits.keys()
    figures_extra = dict(extra or {})
    cleared_wall = datetime.now(UTC) - timedelta(seconds=time.monotonic() - cleared_at)
    for name, group in (stored_after or {}).items():
        times = [t for w in group if w in rows and (t := rows[w].stored_at) is not None]
        figures_extra[f"{name}_stored_after_seconds"] = (
            round((max(times) - cleared_wall).total_seconds(), 1)
            if len(times) == len(group) and times
            else None
        )
    figures = Figures(
        test=os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
        fault=fault,
        webhooks=len(deliveries),
        acknowledged=len(acknowledged),
        stored=len(stored),
        lost=len(acknowledged) - len(stored),
        downloads=total_downloads,
        downloaded_twice=sum(1 for m in media_ids if downloads.get(m, 0) >= 2),
        extra_downloads=extra_downloads,
        lookups=total_lookups,
        recovery_seconds=None if recovery is None else round(recovery, 1),
        bound_seconds=round(bound, 1),
        passed=not problems,
        problems=problems,
        extra=figures_extra,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    record(figures)
    assert not problems, f"{fault}:\n- " + "\n- ".join(problems)
    return figures


# Tests whose figures were recorded in this session (the others failed before the checker).
RECORDED: set[str] = set()


def record(figures: Figures) -> None:
    """Append the figures to ``$INGEST_FAULTS_REPORT`` (JSON lines), when it is set."""
    RECORDED.add(figures.test)
    if not REPORT_PATH:
        return
    with Path(REPORT_PATH).open("a", encoding="utf-8") as report:
        report.write(json.dumps(asdict(figures), sort_keys=True) + "\n")


def record_early_failure(test: str, why: str) -> None:
    """A test that failed before reaching :func:`assert_all_stored` still gets its line."""
    record(
        Figures(
            test=test,
            fault="(failed before the final check)",
            webhooks=0,
            acknowledged=0,
            stored=0,
            lost=0,
            downloads=0,
            downloaded_twice=0,
            extra_downloads=0,
            lookups=0,
            recovery_seconds=None,
            bound_seconds=0,
            passed=False,
            problems=[why],
            extra={},
            at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
    )


def _successful(stats: Mapping[str, Any], endpoint: str) -> dict[str, int]:
    """Requests to ``endpoint`` per media id, minus the errors served for them."""
    requests: dict[str, int] = dict(stats["requests"].get(endpoint, {}))
    for error in stats["errors_served"]:
        if error["endpoint"] == endpoint and error["media_id"] in requests:
            requests[error["media_id"]] -= 1
    return requests


def _wait_final(
    stack: FaultStack, wamids: Sequence[str], deadline: float
) -> tuple[dict[str, MediaItem], float | None]:
    """Poll until every row is final; returns the rows and when (None: not by ``deadline``)."""
    rows: dict[str, MediaItem] = {}
    while True:
        try:
            rows = stack.rows(wamids)
        except SQLAlchemyError:
            pass  # the database may still be coming back
        else:
            if len(rows) == len(wamids) and all(r.state in TERMINAL_STATES for r in rows.values()):
                return rows, time.monotonic()
        if time.monotonic() >= deadline:
            return rows, None
        time.sleep(POLL_SECONDS)


def _duplicate_message_ids(stack: FaultStack, instances: set[str]) -> list[str]:
    query = (
        select(MediaItem.message_id)
        .join(Instance, Instance.id == MediaItem.instance_id)
        .where(Instance.name.in_(instances))
        .group_by(MediaItem.instance_id, MediaItem.message_id)
        .having(func.count() > 1)
    )
    with stack.engine.connect() as conn:
        return list(conn.execute(query).scalars())


def _check_objects(
    stack: FaultStack, stored: Sequence[MediaItem], media_of: Mapping[str, SandboxMedia]
) -> list[str]:
    """The bucket holds exactly the stored rows' objects, each with the media's bytes."""
    problems = []
    client = admin_client(stack.moto.endpoint_url)
    try:
        keys = stack.object_keys()
        expected = {f"media/{row.storage_key}": row for row in stored}
        missing, unexpected = expected.keys() - keys, keys - expected.keys()
        if missing:
            problems.append(f"{len(missing)} stored row(s) without their object")
        if unexpected:
            problems.append(f"{len(unexpected)} object(s) no stored row points at")

        def verify(key: str) -> str | None:
            row = expected[key]
            want = media_of[row.message_id].sha256
            body = client.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
            got = hashlib.sha256(body).hexdigest()
            if got != want or row.actual_sha256 != want:
                return f"{key}: object {got[:12]}, row {row.actual_sha256}, media {want[:12]}"
            return None

        with ThreadPoolExecutor(8) as pool:
            mismatched = [p for p in pool.map(verify, sorted(expected.keys() & keys)) if p]
        if mismatched:
            problems.append(f"{len(mismatched)} object(s) with wrong bytes: {mismatched[:3]}")
    finally:
        client.close()
    return problems


def count_in_logs(processes: Iterable[ManagedProcess], needle: str) -> int:
    return sum(p.log().count(needle) for p in processes)
