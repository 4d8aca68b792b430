"""Workers ride out broker outages, and a worker whose consumer dies exits non-zero (issue 12).

Fault injection killed Redis for 10-60 s under workers with downloads in flight; every
worker died with ``Unrecoverable error: AttributeError("'NoneType' object has no attribute
'hostname'")`` and stayed down (tasks.redis_transport's docstring has the upstream cause).

- :func:`test_losing_redis_with_a_brpop_and_unacked_messages_in_flight` replays, in this
  process and against a real ``redis-server``, the exact calls Celery 5.7 makes when its
  consumer loses the broker, in the state that fails: kombu's own transport raises the
  ``AttributeError`` (the day it stops, upstream fixed it and our override can go); ours
  lets the consumer reconnect, and acknowledges the in-flight message once Redis is back;
- the ``ingest worker`` tests run the real CLI in its own process (through
  :data:`WORKER_ENTRY`, which only adds a test task and, when asked, a fault) against a
  ``redis-server`` of their own that they SIGKILL and restart on the same port, and against
  the machine's RabbitMQ through a TCP proxy they cut and restore.

Every server and process here is started by the test, on free ports, and only those are
signalled: never the machine's Redis on 6379, never the machine's RabbitMQ itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from kombu import Consumer, Exchange, Queue

from ingest import migrate
from ingest.queues import SMALL_MEDIA, DownloadJob, SchedulerUnavailable
from ingest.settings import Settings
from sandbox.processes import WORKER_READY_MARKER, ManagedProcess, ProcessGroup, free_port, wait_for
from tasks import lifecycle, redis_transport
from tasks.celery_app import make_celery
from tasks.dispatch import CeleryScheduler
from tests.conftest import skip_or_fail

AMQP_URL = os.environ.get("INGEST_TEST_AMQP_URL")

# Celery retries a lost broker after 2, 4, 6... seconds: a broker back within 5 s is
# reconnected to about 6 s after the loss. Held tasks outlast that, so they end, and are
# acknowledged, after the reconnection.
OUTAGES_SECONDS = (3.0, 5.0, 3.0)
HOLD_SECONDS = 9.0
CONSUMED_WITHIN_SECONDS = 30.0
# Unrecoverable error -> the stop's grace -> os._exit, plus the time to log and reap.
EXIT_WITHIN_SECONDS = lifecycle.FAILED_WORKER_GRACE_SECONDS + 10.0

# ``ingest worker`` as its own children start it (cli.service._ENTRY), plus, for the test:
# a task that holds a message unacknowledged for a while, recording its start and end in
# files; optionally an extra queue of the test's own (on a shared RabbitMQ); optionally a
# fault: the consumer's event loop raises once a trigger file exists (Celery then reports
# "Unrecoverable error", as it did for the AttributeError).
WORKER_ENTRY = """
import os, time
from pathlib import Path

from celery import bootsteps
from kombu import Queue

from tasks.worker import app

marks = Path(os.environ["OUTAGE_TEST_MARKS"])

@app.task(name="outage_test.hold")
def hold(seconds, name):
    (marks / (name + ".started")).touch()
    time.sleep(seconds)
    (marks / (name + ".done")).touch()

queue = os.environ.get("OUTAGE_TEST_QUEUE")
if queue:
    expiring = Queue(queue, queue_arguments={"x-expires": 600000})
    app.conf.task_queues = [*app.conf.task_queues, expiring]

trigger = os.environ.get("OUTAGE_TEST_CRASH_TRIGGER")
if trigger:
    class Crash(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, c):
            def check():
                if os.path.exists(trigger):
                    raise RuntimeError("injected consumer failure")
            c.hub.on_tick.add(check)

    app.steps["consumer"].add(Crash)

from cli.main import main
main()
"""


# --- servers of the test's own ----------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free port, persisting every write (append-only file, fsync
    always) like a production broker, so a SIGKILL and restart keeps queues and unacked
    messages."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "redis.log").open("ab") as log:
            self.popen = subprocess.Popen(
                [
                    *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--dir", str(self.directory), "--save", ""),
                    *("--appendonly", "yes", "--appendfsync", "always"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log')}")
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 10 s")

    def kill(self) -> None:
        """SIGKILL, as a crashed host or an OOM killer would."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=2, socket_timeout=5)


class TcpProxy:
    """A TCP forwarder the test can cut (every connection aborted, new ones too) and restore,
    in front of a server it must not stop (the machine's RabbitMQ)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._cut = False
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for sock in self._sockets:
                _abort(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _abort(client)
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._cut:
                    for sock in (client, upstream):
                        _abort(sock)
                        sock.close()
                    continue
                self._sockets.update((client, upstream))
            threading.Thread(
                target=self._serve, args=(client, upstream), name="proxy-conn", daemon=True
            ).start()

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        pumps = [
            threading.Thread(target=_pump, args=(client, upstream), daemon=True),
            threading.Thread(target=_pump, args=(upstream, client), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        # Closed only here, once no pump uses them: a socket closed under a pump could see
        # its descriptor reused by the next connection, and the pump write into that one.
        with self._lock:
            self._sockets.difference_update((client, upstream))
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        # An orderly end of one direction is passed on as such: a publisher that closes
        # right after publishing must not have its last frames discarded by a reset.
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        # One side was reset (or the proxy cut): the other side loses its connection too.
        _abort(source)
        _abort(sink)


def _abort(sock: socket.socket) -> None:
    """End the connection now, in both directions: the shutdown wakes a pump blocked on it,
    and with SO_LINGER 0 the eventual close sends a reset (a peer that vanished)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed (broker outage tests)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


# --- the worker ---------------------------------------------------------------------------


class Worker:
    """One ``ingest worker --processes 1 --concurrency 4`` and what the test sends it."""

    def __init__(
        self, group: ProcessGroup, root: Path, broker_url: str, queue: str = SMALL_MEDIA
    ) -> None:
        self.marks = root / "marks"
        self.marks.mkdir(parents=True)
        self.queue = queue
        self.trigger = root / "crash-trigger"
        var = root / "var"
        database_url = f"sqlite:///{root / 'ingest.sqlite3'}"
        migrate.upgrade(database_url)
        self.env = {
            "INGEST_BROKER_URL": broker_url,
            "INGEST_DATABASE_URL": database_url,
            "INGEST_STORAGE_URL": (root / "media").as_uri(),
            "INGEST_VAR_DIR": str(var),
            "INGEST_LOG_LEVEL": "INFO",
            # A node name of its own: the remote-control queue is named after it, and the
            # machine's RabbitMQ is shared with other runs.
            "INGEST_WORKER_NODE_NAME": f"outage-{uuid.uuid4().hex[:8]}@{socket.gethostname()}",
            "OUTAGE_TEST_MARKS": str(self.marks),
        }
        if queue != SMALL_MEDIA:
            self.env["OUTAGE_TEST_QUEUE"] = queue
        self.group = group
        self.settings = Settings(
            var_dir=var, database_url=database_url, broker_url=broker_url, storage_url=""
        )
        self.process: ManagedProcess | None = None
        self._probes = 0

    def start(self, *, crash_on_trigger: bool = False) -> ManagedProcess:
        env = dict(self.env)
        if crash_on_trigger:
            env["OUTAGE_TEST_CRASH_TRIGGER"] = str(self.trigger)
        argv = [sys.executable, "-c", WORKER_ENTRY, "worker", "--processes", "1"]
        argv += ["--concurrency", "4", "--queues", self.queue]
        process = self.process = self.group.start("worker", argv, env=env)
        wait_for(process, lambda: WORKER_READY_MARKER in process.log(), "ready")
        return process

    def scheduler(self) -> CeleryScheduler:
        scheduler = CeleryScheduler.from_settings(self.settings)
        if self.queue != SMALL_MEDIA:
            scheduler.app.amqp.queues[self.queue] = Queue(
                self.queue, queue_arguments={"x-expires": 600000}
            )
        return scheduler

    def hold(self, name: str, seconds: float) -> None:
        """Tasks that keep their message unacknowledged for ``seconds``; returns once running."""
        scheduler = self.scheduler()
        try:
            scheduler.app.send_task("outage_test.hold", args=[seconds, name], queue=self.queue)
        finally:
            scheduler.app.close()
        assert self.process is not None
        wait_for(self.process, (self.marks / f"{name}.started").exists, f"running {name}")

    def held_done(self, name: str) -> bool:
        return (self.marks / f"{name}.done").exists()

    def probe(self) -> None:
        """Publish a real download task (for a row that does not exist) as soon as the
        broker takes it, and wait until the worker ran it: it is consuming."""
        assert self.process is not None
        self._probes += 1
        item = 9_000_000 + self._probes
        deadline = time.monotonic() + CONSUMED_WITHIN_SECONDS
        while True:
            scheduler = self.scheduler()
            try:
                scheduler.schedule([DownloadJob(item, self.queue)])
                break
            except SchedulerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            finally:
                scheduler.app.close()
        # The pipeline's own line for a row it cannot claim.
        line = f"download item={item} outcome=skipped"
        wait_for(
            self.process,
            lambda: line in self.process.log() if self.process else False,
            f"consuming (probe {item})",
            timeout=max(deadline - time.monotonic(), 1.0),
        )


def _wait(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout:.0f} s")
        time.sleep(0.1)


def _assert_never_died(process: ManagedProcess) -> None:
    log = process.log()
    assert "Unrecoverable error" not in log, process.tail()
    if not process.alive():
        raise process.fail(f"exited with {process.popen.returncode}")


# --- tests ------------------------------------------------------------------------------


def test_the_app_retries_the_broker_forever_and_exits_on_a_failed_stop(
    make_settings: Any,
) -> None:
    app = make_celery(make_settings(broker_url="redis://127.0.0.1:1/0"))
    assert app.conf.broker_connection_max_retries is None
    assert lifecycle.ExitOnFailure in app.steps["worker"]


@pytest.mark.redis
@pytest.mark.parametrize("transport", ["ours", "kombu"])
def test_losing_redis_with_a_brpop_and_unacked_messages_in_flight(
    transport: str, redis_server: RedisServer, make_settings: Any
) -> None:
    app = make_celery(make_settings(broker_url=redis_server.url))
    if transport == "kombu":
        app.conf.broker_transport = None  # kombu's own Redis transport
    CeleryScheduler(app).schedule([DownloadJob(1, SMALL_MEDIA)])
    connection = app.connection_for_read()
    opened: list[Any] = []
    try:
        connection.ensure_connection(max_retries=1)
        # The worker's state when the loss is handled: the task channel holds a delivered,
        # unacknowledged message and has its next BRPOP outstanding...
        task_channel = connection.default_channel
        opened.append(task_channel)
        delivered: list[Any] = []
        Consumer(
            task_channel,
            [app.amqp.queues[SMALL_MEDIA]],
            callbacks=[lambda _body, message: delivered.append(message)],
            no_ack=False,
        ).consume()
        connection.drain_events(timeout=5)
        assert len(delivered) == 1
        with pytest.raises(socket.timeout):
            connection.drain_events(timeout=0.1)
        assert task_channel._in_poll
        # ... and the remote-control channel has its auto-delete fanout queue (pidbox).
        pidbox = Queue(
            f"outage-{uuid.uuid4().hex[:8]}.pidbox",
            Exchange("outage.pidbox", "fanout"),
            auto_delete=True,
        )
        pidbox_channel = connection.channel()
        opened.append(pidbox_channel)
        Consumer(pidbox_channel, [pidbox], callbacks=[], no_ack=True).consume()

        redis_server.kill()
        # What Celery's consumer runs on a lost connection, on a stand-in consumer.
        consumer = SimpleNamespace(
            connection=connection,
            app=SimpleNamespace(
                conf=SimpleNamespace(
                    worker_cancel_long_running_tasks_on_connection_loss=True,
                    worker_enable_prefetch_count_reduction=False,
                )
            ),
        )
        lost = redis.exceptions.ConnectionError("Connection closed by server.")
        if transport == "kombu":
            with pytest.raises(AttributeError, match="hostname"):
                CeleryConsumer.on_connection_error_after_connected(consumer, lost)
            return
        CeleryConsumer.on_connection_error_after_connected(consumer, lost)
        assert consumer.connection is None

        # The message stayed unacked in Redis; its task ends after Redis is back, and the
        # ack reaches the server through the closed channel, which kept its address.
        redis_server.start()
        client = redis_server.client()
        try:
            assert client.hlen(task_channel.unacked_key) == 1
            delivered[0].ack()
            assert client.hlen(task_channel.unacked_key) == 0
        finally:
            client.close()
        # A detached channel never consumes again.
        assert isinstance(task_channel, redis_transport.Channel)
        with pytest.raises(redis.exceptions.ConnectionError):
            task_channel._connparams(asynchronous=True)
    finally:
        # What the interrupted closes left open, and the pool the late ack used: nothing but
        # the garbage collector would close them (with a ResourceWarning).
        for channel in opened:
            channel._disconnect_pools()
            channel._close_clients()
        connection.release()
        app.close()


@pytest.mark.e2e
@pytest.mark.redis
def test_a_worker_rides_out_redis_killed_and_restarted(
    redis_server: RedisServer, stack_processes: ProcessGroup, tmp_path: Path
) -> None:
    worker = Worker(stack_processes, tmp_path / "stack", redis_server.url)
    process = worker.start()
    worker.probe()
    held: list[str] = []
    for n, outage in enumerate(OUTAGES_SECONDS, start=1):
        # Two downloads' worth of unacknowledged messages in flight, and (prefetch 4) the
        # next BRPOP outstanding: the state in which the workers died.
        for name in (f"round{n}a", f"round{n}b"):
            worker.hold(name, HOLD_SECONDS)
            held.append(name)
        redis_server.kill()
        time.sleep(outage)
        redis_server.start()
        worker.probe()
        _assert_never_died(process)
        assert process.log().count("Connection to broker lost") >= n
        # The held tasks end after the reconnection; the next round starts from there.
        _wait(lambda: all(map(worker.held_done, held)), "done holding", HOLD_SECONDS + 5)

    _assert_never_died(process)
    # Every message in flight across an outage was acknowledged once its task ended:
    # none is left for the visibility timeout to redeliver a quarter of an hour later.
    client = redis_server.client()
    try:
        _wait(lambda: client.hlen("unacked") == 0, "acknowledged", 10)
    finally:
        client.close()


@pytest.mark.e2e
def test_a_worker_rides_out_rabbitmq_cut_off(stack_processes: ProcessGroup, tmp_path: Path) -> None:
    if not AMQP_URL:
        skip_or_fail("INGEST_TEST_AMQP_URL is not set (RabbitMQ broker tests)")
    assert AMQP_URL is not None
    from kombu.utils.url import url_to_parts

    _, host, port, user, password, _, _ = url_to_parts(AMQP_URL)
    target = (host or "127.0.0.1", int(port or 5672))
    try:
        socket.create_connection(target, timeout=2).close()
    except OSError as exc:
        skip_or_fail(f"RabbitMQ at INGEST_TEST_AMQP_URL is unreachable: {exc}")
    proxy = TcpProxy(target)
    # A queue of the test's own: the machine's RabbitMQ is shared, its media.small too.
    queue = f"{SMALL_MEDIA}.outage-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        stack_processes,
        tmp_path / "stack",
        f"amqp://{user}:{password}@127.0.0.1:{proxy.port}//",
        queue=queue,
    )
    try:
        process = worker.start()
        worker.probe()
        for n, outage in enumerate((3.0, 5.0), start=1):
            worker.hold(f"round{n}", 4.0)
            proxy.cut()
            time.sleep(outage)
            proxy.restore()
            worker.probe()
            _assert_never_died(process)
            assert process.log().count("Connection to broker lost") >= n
    finally:
        stack_processes.stop_all()
        proxy.close()
        _delete_amqp_queue(AMQP_URL, queue)


def _delete_amqp_queue(url: str, name: str) -> None:
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(url, connect_timeout=5) as connection:
        connection.default_channel.queue_delete(name)


@pytest.mark.e2e
@pytest.mark.redis
def test_a_worker_whose_consumer_dies_exits_non_zero_in_time(
    redis_server: RedisServer, stack_processes: ProcessGroup, tmp_path: Path
) -> None:
    worker = Worker(stack_processes, tmp_path / "stack", redis_server.url)
    process = worker.start(crash_on_trigger=True)
    # A task that would keep a warm stop waiting for a minute, as a stalled download would.
    worker.hold("stalled", 60.0)
    worker.trigger.touch()
    died = time.monotonic()
    try:
        status = process.popen.wait(timeout=EXIT_WITHIN_SECONDS)
    except subprocess.TimeoutExpired as still_running:
        why = f"still running {EXIT_WITHIN_SECONDS:.0f} s after its consumer died"
        raise process.fail(why) from still_running
    assert "Unrecoverable error: RuntimeError('injected consumer failure')" in process.log()
    assert status != 0, process.tail()
    assert time.monotonic() - died < EXIT_WITHIN_SECONDS
    assert not worker.held_done("stalled")
