"""Real processes for end-to-end tests and benchmarks: gunicorn, Celery worker and beat.

Everything runs as a subprocess with an explicit environment, logs to a file, waits for
readiness and is always terminated (SIGTERM, then SIGKILL). Two flavours of environment:

- :func:`embedded_stack_env`: the embedded defaults (SQLite file, ``sqla+sqlite`` broker,
  local files) under one temporary ``var`` directory;
- :func:`service_stack_env`: a fresh PostgreSQL database on ``INGEST_TEST_DATABASE_URL``'s
  server, a key prefix of its own on ``INGEST_TEST_REDIS_URL``'s Redis, and a fresh bucket on
  a moto server.

Other engineers run tests on this machine at the same time: every port is free-found, every
name is unique, and Redis keys live under a prefix per stack (see :class:`RedisKeyspace`).

Fixtures: ``stack_processes`` (a :class:`ProcessGroup` that prints the tail of every log when
the test failed), ``embedded_stack`` (an environment), ``service_stack`` (an environment;
skips or fails per ``tests.conftest.skip_or_fail`` when the services are not configured).
Benchmarks use the classes and functions directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ingest.secrets import generate_key
from ingest.settings import Settings
from sandbox.server import media_hosts_for

INGEST = str(Path(sys.executable).parent / "ingest")
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL_LINES = 60
# Markers Celery prints once a process is serving; waiting on them is cheaper than a probe
# task and needs no result backend (results are disabled by design).
WORKER_READY_MARKER = " ready."
BEAT_READY_MARKER = "beat: Starting..."

# Variables of the parent that must not reach a child: a developer's INGEST_* settings, and
# prometheus' multi-process directory (each stack has its own under its var dir), and AWS
# credentials (a stack that needs S3 gets dummy ones for its moto server).
_STRIPPED_PREFIXES = ("INGEST_", "PROMETHEUS_MULTIPROC_DIR", "AWS_")


class ProcessError(RuntimeError):
    """A process exited or never became ready; the message ends with its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(_STRIPPED_PREFIXES) or name.startswith("INGEST_TEST_")
    }
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    base_url: str | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, lines)

    def fail(self, why: str) -> ProcessError:
        return ProcessError(
            f"{self.name}: {why}\n--- last lines of {self.log_path} ---\n{self.tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the whole process group: what a crashed machine would do."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after a grace period."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                return
        # Children (gunicorn workers, celery pool) share the group: reap anything left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(timeout=STOP_TIMEOUT_SECONDS)


def wait_for(
    process: ManagedProcess,
    ready: Callable[[], bool],
    what: str,
    timeout: float = READY_TIMEOUT_SECONDS,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise process.fail(f"exited with {process.popen.returncode} before {what}")
        if ready():
            return
        time.sleep(0.1)
    raise process.fail(f"not {what} after {timeout:.0f} s")


def http_answers(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    return probe


def log_contains(process: ManagedProcess, marker: str) -> Callable[[], bool]:
    return lambda: marker in process.log()


@dataclass
class ProcessGroup:
    """Starts ``ingest`` processes with one environment; stops all of them at the end."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(
        self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}-{len(self.processes)}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_environment({**self.env, **(env or {})}),
                # Own process group, so stop() reaches gunicorn's and celery's children.
                start_new_session=True,
            )
        process = ManagedProcess(name=name, argv=argv, popen=popen, log_path=log_path)
        self.processes.append(process)
        return process

    def web(self, *, env: Mapping[str, str] | None = None, workers: int = 2) -> ManagedProcess:
        """``ingest web`` (gunicorn) on a free port, ready once ``/healthz`` answers."""
        return self._serve(
            "web",
            lambda port: [INGEST, "web", "--port", str(port), "--workers", str(workers)],
            "/healthz",
            env=env,
        )

    def sandbox(self, *, latency_ms: float = 0.0) -> ManagedProcess:
        """``ingest sandbox`` (the provider stand-in) in its own process, without access log."""
        return self._serve(
            "sandbox",
            lambda port: [
                INGEST,
                "sandbox",
                "--port",
                str(port),
                "--latency-ms",
                str(latency_ms),
                "--quiet",
            ],
            "/_sandbox/stats",
        )

    def _serve(
        self,
        name: str,
        argv_for: Callable[[int], list[str]],
        ready_path: str,
        *,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """A server on a free port, returned once ``ready_path`` answers 200."""
        last: ProcessError | None = None
        for _ in range(3):  # the free port may be taken before the server binds it
            port = free_port()
            process = self.start(name, argv_for(port), env=env)
            process.base_url = f"http://127.0.0.1:{port}"
            try:
                wait_for(process, http_answers(process.base_url + ready_path), "answering")
                return process
            except ProcessError as exc:
                last = exc
                process.stop()
        assert last is not None
        raise last

    def worker(
        self,
        *,
        env: Mapping[str, str] | None = None,
        concurrency: int = 8,
        queues: str | None = None,
        processes: int | None = None,
    ) -> ManagedProcess:
        """``ingest worker``, returned once every one of its Celery processes is ready."""
        count = processes or min(os.cpu_count() or 1, concurrency)
        argv = [INGEST, "worker", "--concurrency", str(concurrency), "--processes", str(count)]
        if queues:
            argv += ["--queues", queues]
        # The readiness marker is an INFO line, one per Celery process.
        process = self.start("worker", argv, env={"INGEST_LOG_LEVEL": "INFO", **(env or {})})
        wait_for(process, lambda: process.log().count(WORKER_READY_MARKER) >= count, "ready")
        return process

    def beat(self, *, env: Mapping[str, str] | None = None) -> ManagedProcess:
        process = self.start(
            "beat", [INGEST, "beat"], env={"INGEST_LOG_LEVEL": "INFO", **(env or {})}
        )
        wait_for(process, log_contains(process, BEAT_READY_MARKER), "started")
        return process

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one ``ingest`` command to completion (registry, db upgrade...)."""
        result = subprocess.run(
            [INGEST, *args],
            env=child_environment({**self.env, **(env or {})}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise ProcessError(
                f"ingest {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def stop_all(self) -> None:
        # Reverse order: web first would leave beat publishing to a broker nobody reads,
        # which is harmless; workers last so they may finish what they hold.
        for process in reversed(self.processes):
            process.stop()

    def report(self) -> str:
        return "\n".join(
            f"--- {p.name} (pid {p.pid}, {p.log_path}) ---\n{p.tail()}" for p in self.processes
        )


# --- environments ----------------------------------------------------------------------


@dataclass
class StackEnv:
    """The ``INGEST_*`` variables one stack runs with, plus what the test needs to reach it."""

    env: dict[str, str]
    flavour: str  # "embedded" or "services"
    database_url: str
    storage_url: str
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def settings(self) -> Settings:
        """Settings for the test process itself, to read the stack's database and storage."""
        return Settings(
            var_dir=Path(self.env.get("INGEST_VAR_DIR", "var")),
            database_url=self.database_url,
            broker_url="memory://",
            storage_url=self.storage_url,
            s3_endpoint_url=self.env.get("INGEST_S3_ENDPOINT_URL"),
            secret_key=self.env.get("INGEST_SECRET_KEY"),
        )

    def close(self) -> None:
        for step in reversed(self.cleanup):
            step()
        self.cleanup.clear()


def embedded_stack_env(root: Path, **extra: str) -> StackEnv:
    """Embedded defaults (SQLite, SQLite broker, local files) under ``root/var``, migrated."""
    from ingest import migrate

    var = root / "var"
    var.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{var / 'ingest.sqlite3'}"
    migrate.upgrade(database_url)
    env = {
        "INGEST_VAR_DIR": str(var),
        # The sandbox's address and port, when the caller names it (an entry without a
        # port allows only 80/443); a caller that starts one later sets its own.
        "INGEST_MEDIA_HOSTS": ",".join(
            media_hosts_for(extra.get("INGEST_GRAPH_URL", "http://127.0.0.1"))
        ),
        "INGEST_LOG_LEVEL": "INFO",
        **extra,
    }
    return StackEnv(
        env=env,
        flavour="embedded",
        database_url=database_url,
        storage_url=(var / "media").as_uri(),
    )


class RedisKeyspace:
    """A key prefix of its own on a shared Redis, so parallel runs never share queues.

    Celery's queue names are fixed; ``INGEST_BROKER_PREFIX`` (kombu's ``global_keyprefix``)
    and ``INGEST_REDIS_PREFIX`` put every key of one stack under one unique prefix, and
    :meth:`release` deletes them, so no stale wake-up survives for anyone else.
    """

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self.prefix = f"ingest-e2e-{uuid.uuid4().hex[:12]}"

    def env(self) -> dict[str, str]:
        return {"INGEST_BROKER_PREFIX": self.prefix, "INGEST_REDIS_PREFIX": self.prefix}

    def release(self) -> None:
        import redis

        client = redis.Redis.from_url(self._redis_url)
        try:
            for key in client.scan_iter(f"{self.prefix}*", count=1000):
                client.delete(key)
        finally:
            client.close()


def create_postgres_database(server_url: str) -> tuple[str, Callable[[], None]]:
    """A fresh, migrated database on ``server_url``'s server; returns its URL and a dropper."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from ingest import migrate
    from ingest.db import make_engine

    server = make_url(server_url)
    name = f"ingest_e2e_{uuid.uuid4().hex[:10]}"
    admin = make_engine(server.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


# moto accepts any credentials; these keep every child away from a real AWS account.
S3_DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def create_bucket(endpoint_url: str, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=S3_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    try:
        client.create_bucket(Bucket=bucket)
    finally:
        client.close()


def service_stack_env(
    database_server_url: str,
    redis_url: str,
    s3_endpoint_url: str,
    **extra: str,
) -> StackEnv:
    """PostgreSQL + Redis (broker and shared counters) + S3 on a moto server."""
    stack = StackEnv(env={}, flavour="services", database_url="", storage_url="")
    try:
        database_url, drop = create_postgres_database(database_server_url)
        stack.cleanup.append(drop)
        keyspace = RedisKeyspace(redis_url)
        stack.cleanup.append(keyspace.release)
        bucket = f"ingest-e2e-{uuid.uuid4().hex[:16]}"
        create_bucket(s3_endpoint_url, bucket)
    except BaseException:
        stack.close()
        raise
    stack.database_url = database_url
    stack.storage_url = f"s3://{bucket}/media"
    stack.env = {
        "INGEST_DATABASE_URL": database_url,
        # A server database has no key file beside it: the stack's own key.
        "INGEST_SECRET_KEY": generate_key(),
        "INGEST_BROKER_URL": redis_url,
        "INGEST_REDIS_URL": redis_url,
        **keyspace.env(),
        "INGEST_STORAGE_URL": stack.storage_url,
        "INGEST_S3_ENDPOINT_URL": s3_endpoint_url,
        "INGEST_MEDIA_HOSTS": ",".join(
            media_hosts_for(extra.get("INGEST_GRAPH_URL", "http://127.0.0.1"))
        ),
        "INGEST_LOG_LEVEL": "INFO",
        **S3_DUMMY_CREDENTIALS,
        **extra,
    }
    return stack


# --- fixtures --------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"_processes_report_{report.when}", report)


@pytest.fixture
def stack_processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessGroup]:
    """A :class:`ProcessGroup` logging under ``tmp_path/logs``; log tails shown on failure."""
    group = ProcessGroup(log_dir=tmp_path / "logs")
    try:
        yield group
    finally:
        group.stop_all()
        call_report = getattr(request.node, "_processes_report_call", None)
        if call_report is not None and call_report.failed and group.processes:
            sys.stderr.write("\n" + group.report() + "\n")


@pytest.fixture
def embedded_stack(tmp_path: Path) -> Iterator[StackEnv]:
    stack = embedded_stack_env(tmp_path / "stack")
    yield stack
    stack.close()


@pytest.fixture
def service_stack(request: pytest.FixtureRequest) -> Iterator[StackEnv]:
    from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL, skip_or_fail

    if not TEST_DATABASE_URL or not TEST_REDIS_URL:
        skip_or_fail("INGEST_TEST_DATABASE_URL and INGEST_TEST_REDIS_URL are needed (e2e)")
    assert TEST_DATABASE_URL is not None and TEST_REDIS_URL is not None
    moto = request.getfixturevalue("moto_server")  # only started once we know we need it
    stack = service_stack_env(TEST_DATABASE_URL, TEST_REDIS_URL, moto.endpoint_url)
    yield stack
    stack.close()
