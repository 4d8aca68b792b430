"""Real processes for the demo, end-to-end tests and benchmarks: ``ingest`` web, worker, beat
and sandbox, or any other command, each in a session of its own.

Every process runs with an explicit environment, logs to a file (or nowhere), is waited on
until it is ready and is always stopped as a whole group: SIGTERM, then SIGKILL for whatever
is left (gunicorn's workers and Celery's pool share their parent's group).

Other people run tests and benchmarks on the same machine at the same time: every port is
found free, and a server that loses its port before binding it is started again on another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

INGEST = str(Path(sys.executable).parent / "ingest")
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
# When the run is over (a test's teardown, a benchmark's round): a second to exit on SIGTERM,
# then SIGKILL. A worker's graceful stop waits for its broker poll and its threads, seconds
# that nobody needs once the results are in.
QUICK_STOP_SECONDS = 1.0
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


def answers(url: str) -> bool:
    """True when a GET of ``url`` answers 200 within a second."""
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def ingest_executable() -> str:
    """This environment's ``ingest`` command, else the one on PATH."""
    if Path(INGEST).exists():
        return INGEST
    found = shutil.which("ingest")
    if not found:
        raise ProcessError("cannot find the `ingest` executable")
    return found


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


def stop_groups(
    popens: Sequence[subprocess.Popen[bytes]], grace: float = STOP_TIMEOUT_SECONDS
) -> None:
    """SIGTERM the process groups of ``popens`` all at once, then SIGKILL whatever is left
    after ``grace`` seconds: stopping several takes the longest of them, not the sum. Each
    must lead a session of its own (see :func:`start_process`)."""
    running = [popen for popen in popens if popen.poll() is None]
    for popen in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for popen in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    for popen in popens:
        # Children (gunicorn workers, celery pool) share the group: reap anything left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        if popen.poll() is None:
            popen.wait(timeout=STOP_TIMEOUT_SECONDS)


def stop_group(popen: subprocess.Popen[bytes], grace: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM the process group of ``popen``, then SIGKILL whatever is left after ``grace``."""
    stop_groups([popen], grace)


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

    def stop(self, grace: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace``."""
        stop_group(self.popen, grace)


def start_process(
    name: str, argv: list[str], log_path: Path | None, env: Mapping[str, str]
) -> ManagedProcess:
    """``argv`` with exactly ``env``, its output to ``log_path`` (None: discarded), leading a
    session of its own so that :meth:`ManagedProcess.stop` reaches all its children."""
    with contextlib.ExitStack() as files:
        log_file = (
            files.enter_context(log_path.open("wb")) if log_path is not None else subprocess.DEVNULL
        )
        popen = subprocess.Popen(  # noqa: S603 - our own commands
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
    return ManagedProcess(name=name, argv=argv, popen=popen, log_path=log_path or Path(os.devnull))


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
    return lambda: answers(url)


def log_contains(process: ManagedProcess, marker: str) -> Callable[[], bool]:
    return lambda: marker in process.log()


def serve_on_free_port(
    start: Callable[[int], ManagedProcess], ready_path: str, attempts: int = 3
) -> ManagedProcess:
    """``start(port)`` on a free port, returned once ``ready_path`` answers 200 there."""
    last: ProcessError | None = None
    for _ in range(attempts):  # the free port may be taken before the server binds it
        port = free_port()
        process = start(port)
        process.base_url = f"http://127.0.0.1:{port}"
        try:
            wait_for(process, http_answers(process.base_url + ready_path), "answering")
            return process
        except ProcessError as exc:
            last = exc
            process.stop()
    assert last is not None
    raise last


@dataclass
class ProcessGroup:
    """Starts processes with one environment; stops all of them at the end."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    executable: str = field(default_factory=ingest_executable)

    def start(
        self, name: str, argv: list[str], *, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}-{len(self.processes)}.log"
        process = start_process(
            name, argv, log_path, child_environment({**self.env, **(env or {})})
        )
        self.processes.append(process)
        return process

    def web(self, *, env: Mapping[str, str] | None = None, workers: int = 2) -> ManagedProcess:
        """``ingest web`` (gunicorn) on a free port, ready once ``/healthz`` answers."""
        return serve_on_free_port(
            lambda port: self.start(
                "web",
                [self.executable, "web", "--port", str(port), "--workers", str(workers)],
                env=env,
            ),
            "/healthz",
        )

    def sandbox(self, *, latency_ms: float = 0.0) -> ManagedProcess:
        """``ingest sandbox`` (the provider stand-in) in its own process, without access log."""
        return serve_on_free_port(
            lambda port: self.start(
                "sandbox",
                [
                    INGEST,
                    "sandbox",
                    "--port",
                    str(port),
                    "--latency-ms",
                    str(latency_ms),
                    "--quiet",
                ],
            ),
            "/_sandbox/stats",
        )

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
        argv = [
            self.executable,
            "worker",
            "--concurrency",
            str(concurrency),
            "--processes",
            str(count),
        ]
        if queues:
            argv += ["--queues", queues]
        # The readiness marker is an INFO line, one per Celery process.
        process = self.start("worker", argv, env={"INGEST_LOG_LEVEL": "INFO", **(env or {})})
        wait_for(process, lambda: process.log().count(WORKER_READY_MARKER) >= count, "ready")
        return process

    def beat(self, *, env: Mapping[str, str] | None = None) -> ManagedProcess:
        process = self.start(
            "beat", [self.executable, "beat"], env={"INGEST_LOG_LEVEL": "INFO", **(env or {})}
        )
        wait_for(process, log_contains(process, BEAT_READY_MARKER), "started")
        return process

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one ``ingest`` command to completion (registry, db upgrade...)."""
        result = subprocess.run(  # noqa: S603 - our own CLI
            [self.executable, *args],
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

    def stop_all(self, grace: float = STOP_TIMEOUT_SECONDS) -> None:
        # All at once: each process stops on its own terms (workers finish or hand back what
        # they hold), and nothing here depends on another being up while it stops.
        stop_groups([process.popen for process in self.processes], grace)

    def report(self) -> str:
        return "\n".join(
            f"--- {p.name} (pid {p.pid}, {p.log_path}) ---\n{p.tail()}" for p in self.processes
        )
