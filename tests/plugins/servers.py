"""Servers a fault test may kill: its own Redis, its own PostgreSQL, a TCP gate in front of S3.

Fault tests stop, kill and pause the services under the stack, so none of these may be the
machine's shared PostgreSQL (5432) or Redis (6379): each is started here, on a free port,
in a temporary directory, and only ever signalled through the objects below.

- :class:`RedisServer`: ``redis-server`` without persistence; :meth:`RedisServer.kill`
  (SIGKILL) and :meth:`RedisServer.restart` on the same port, as a supervisor would;
- :class:`PostgresCluster`: ``initdb`` once, ``pg_ctl start``/``stop -m immediate``, and a
  fresh migrated database per test cloned from a template (``CREATE DATABASE .. TEMPLATE``);
- :class:`TcpGate`: a forwarding proxy that can turn into a dead endpoint (every connection
  reset) and back without losing the state of the server behind it (moto keeps its objects
  in memory: stopping it for real would lose the bucket);
- :func:`close_with_reset`: close a socket so that its peer sees a reset.

Nothing here imports ``ingest`` at module level.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox.processes import free_port

START_TIMEOUT_SECONDS = 30.0


class ServerError(RuntimeError):
    """A server did not start or stop; the message ends with its log tail."""


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _poll(ready: Callable[[], bool], timeout: float = START_TIMEOUT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.05)
    return False


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- Redis -------------------------------------------------------------------------------


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass
class RedisServer:
    """One ``redis-server`` of a test's own; no persistence, so a restart starts empty."""

    binary: str
    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisServer:
        """Start on ``port`` (a free one the first time); ready once it answers PING."""
        for _ in range(3):
            if not self.port:
                self.port = free_port()
            if self._start_once():
                return self
            if self.starts > 0:  # a restart must keep its port
                break
            self.port = 0
        raise ServerError(f"redis-server did not start\n{_log_tail(self.log_path)}")

    def _start_once(self) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if _poll(self._answers, 10.0):
            self.starts += 1
            return True
        self._reap(signal.SIGKILL)
        return False

    def _answers(self) -> bool:
        import redis

        if not self.alive():
            return False
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the server and everything in it are gone at once."""
        self._reap(signal.SIGKILL)

    def restart(self) -> None:
        """Start again on the same port, empty (what a supervisor does after a crash)."""
        if self.alive():
            raise ServerError("restart() of a redis-server that is still running")
        self.start()

    def flushall(self) -> None:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=5)
        try:
            client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        self._reap(signal.SIGTERM)

    def _reap(self, signum: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


# --- PostgreSQL --------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, or Debian's versioned layout."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


def _unprivileged_user() -> str | None:
    """initdb and postgres refuse to run as root: the account to run them as, or None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ServerError("running as root and there is no postgres or nobody account")


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster of the test session's own, on a free port, trust auth."""

    bin_dir: Path
    root: Path
    port: int = 0
    user: str | None = None
    template: str = ""

    @classmethod
    def create(cls, bin_dir: Path) -> PostgresCluster:
        # Not under pytest's temp dir: that is 0700 for root, and postgres must traverse it.
        root = Path(tempfile.mkdtemp(prefix="ingest-faults-pg-"))
        cluster = cls(bin_dir=bin_dir, root=root, user=_unprivileged_user())
        if cluster.user is not None:
            entry = pwd.getpwnam(cluster.user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        cluster._run(
            "initdb",
            "-D",
            str(cluster.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        return cluster

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def server_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str, timeout: float = 60.0) -> None:
        argv = [str(self.bin_dir / program), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServerError(f"{program}: {exc}") from exc
        if result.returncode != 0:
            raise ServerError(
                f"{program} {' '.join(args)} exited {result.returncode}:\n{result.stdout}"
                f"{result.stderr}\n{_log_tail(self.log_path)}"
            )

    def start(self) -> None:
        """``pg_ctl start`` (waits until it accepts connections); the same port every time.

        ``fsync=off`` only matters for a machine crash; ``synchronous_commit`` stays on, so a
        commit acknowledged before ``stop -m immediate`` is still there afterwards.
        """
        if not self.port:
            self.port = free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=300"
        )
        log = str(self.log_path)
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>``; ``immediate`` is a crash: no checkpoint, clients cut."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists() and _port_answers(self.port)

    def prepare_template(self) -> None:
        """One migrated database that every test's database is copied from."""
        from ingest import migrate

        self.template = f"ingest_faults_template_{uuid.uuid4().hex[:8]}"
        self._execute(f'CREATE DATABASE "{self.template}"')
        migrate.upgrade(self.server_url(self.template))

    def create_database(self) -> str:
        """A fresh migrated database (a copy of the template); returns its URL."""
        name = f"ingest_faults_{uuid.uuid4().hex[:10]}"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return self.server_url(name)

    def drop_database(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        if self.running():
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _execute(self, statement: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.server_url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(statement))
        finally:
            engine.dispose()

    def close(self) -> None:
        with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
            if (self.data_dir / "postmaster.pid").exists():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# --- a gate in front of a TCP server -------------------------------------------------------


def close_with_reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees "connection reset", as from a dead host.

    Safe while another thread is blocked reading the socket: closing alone would not wake
    it, and the kernel sends nothing until that read returns, so the peer would wait out its
    read timeout on a connection that looks alive. Shutting the reading side first wakes the
    reader; the reset goes out once the last user lets go."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class TcpGate:
    """Forwards 127.0.0.1:<port> to a target; :meth:`close_gate` makes the endpoint dead.

    Closed, the gate resets every open connection and every new one as soon as it is
    accepted (a client sees ``ECONNRESET``, as from a load balancer with no backend). The
    listening socket is kept, so the port cannot be lost while closed, and the server behind
    it keeps its state.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-gate", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close_gate(self) -> None:
        self._open.clear()
        with self._lock:
            connections, self._connections = self._connections, set()
        for sock in connections:
            close_with_reset(sock)

    def open_gate(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self._stopping = True
        self.close_gate()
        with contextlib.suppress(OSError):
            # As for a connection: closing alone does not wake the thread blocked in accept.
            self._listener.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                close_with_reset(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                close_with_reset(client)
                continue
            with self._lock:
                # Closed while this connection was being made: close_gate has already taken
                # the connections it resets, so this one is reset here.
                admitted = self._open.is_set()
                if admitted:
                    self._connections.update((client, upstream))
            if not admitted:
                close_with_reset(client)
                close_with_reset(upstream)
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(source)
                self._connections.discard(sink)
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
