"""What the benchmarks share: a keep-alive HTTP load generator, its summary, a gunicorn
launcher, and CPU readings of processes and of the whole machine.

The generator runs in separate processes (spawned, so the server under test and the client
do not share a GIL), each with threads holding one ``http.client`` connection apiece,
re-opened whenever the server closes it.
Requests before the warm-up ends are sent and answered but not measured. Every generator
process starts its clock at the same moment, once all of them are ready, so a caller can take
readings of its own over exactly the measured window (a :class:`Window`).
"""

from __future__ import annotations

import http.client
import multiprocessing
import queue as queue_module
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psutil

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from sandbox.processes import ManagedProcess, ProcessGroup

# Given a request id unique within the run, the body and the headers that go with it only
# (a signature, say). Must be a module-level function: it crosses into spawned processes.
BodyFactory = Callable[[str], tuple[bytes, dict[str, str]]]


PlanT = TypeVar("PlanT", bound="DataclassInstance")


def with_overrides(plan: PlanT, **values: Any) -> PlanT:
    """``plan`` (a dataclass) with the values given on the command line; ``None`` is not given."""
    return replace(plan, **{key: value for key, value in values.items() if value is not None})


@dataclass(frozen=True)
class Request:
    """What every generated request is; ``body`` makes a fresh one per request when given."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: BodyFactory | None = None


class LoadPlan(Protocol):
    @property
    def seconds(self) -> float: ...
    @property
    def warmup_seconds(self) -> float: ...
    @property
    def connections(self) -> int: ...
    @property
    def load_processes(self) -> int: ...


class Window(Protocol):
    """Readings over the measured window: ``begin`` as the warm-up ends, ``end`` as the load
    stops, both called from a thread of the generating process."""

    def begin(self) -> None: ...
    def end(self) -> None: ...


@dataclass
class LoadResult:
    latencies_ms: list[float]
    statuses: dict[int, int]
    errors: int
    seconds: float
    acknowledged: int  # every 200, warm-up included


def _load_process(
    port: int,
    request: Request,
    connections: int,
    seconds: float,
    warmup: float,
    tag: str,
    queue: Any,
    start_at: Callable[[], float],
) -> None:
    """One generator process: ``connections`` threads, each one connection, for ``seconds``
    from the moment ``start_at`` returns (a ``time.monotonic`` reading, one clock for every
    process of the machine)."""
    start = start_at()
    measure_from = start + warmup
    stop = measure_from + seconds
    latencies: list[list[float]] = [[] for _ in range(connections)]
    statuses: list[dict[int, int]] = [{} for _ in range(connections)]
    errors = [0] * connections
    acknowledged = [0] * connections
    static_headers = dict(request.headers)

    def run(slot: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        n = 0
        while time.monotonic() < start:
            time.sleep(0.001)
        while (now := time.monotonic()) < stop:
            n += 1
            body: bytes | None = None
            headers = static_headers
            if request.body is not None:
                # Built (and signed) before the clock starts: the server's time is measured.
                body, extra = request.body(f"{tag}.{slot}.{n}")
                headers = {**static_headers, **extra}
            began = time.perf_counter()
            try:
                conn.request(request.method, request.path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
                if response.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException):
                conn.close()
                errors[slot] += 1
                continue
            elapsed = (time.perf_counter() - began) * 1000
            if status == 200:
                acknowledged[slot] += 1
            if now >= measure_from:
                latencies[slot].append(elapsed)
                statuses[slot][status] = statuses[slot].get(status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put(
        LoadResult(
            latencies_ms=[value for slot in latencies for value in slot],
            statuses=_merge(statuses),
            errors=sum(errors),
            seconds=seconds,
            acknowledged=sum(acknowledged),
        )
    )


def _merge(counts: list[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for each in counts:
        for status, count in each.items():
            merged[status] = merged.get(status, 0) + count
    return merged


# From the start's announcement to the first request: time for every thread to be waiting.
START_DELAY_SECONDS = 0.2
# How long the load processes may take to be ready (spawning and importing).
READY_TIMEOUT_SECONDS = 120.0


def generate_load(
    port: int,
    request: Request,
    plan: LoadPlan,
    label: str = "load",
    *,
    window: Window | None = None,
) -> LoadResult:
    """``plan.connections`` connections to ``127.0.0.1:port`` split over the load processes.

    ``plan.load_processes == 0`` runs the threads in this process instead, sparing the
    seconds a spawned process costs (smoke runs only: the client then shares our GIL).
    ``window``, when given, is read as the measured window begins and ends.
    """
    if plan.load_processes == 0:
        inline: queue_module.Queue[LoadResult] = queue_module.Queue()
        start = time.monotonic() + START_DELAY_SECONDS
        with _reading(window, start + plan.warmup_seconds, plan.seconds):
            _load_process(
                port,
                request,
                plan.connections,
                plan.seconds,
                plan.warmup_seconds,
                label,
                inline,
                lambda: start,
            )
        return inline.get()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    # Spawned processes take a second or more to import; the clock starts once all have.
    starting = _SharedStart(context, plan.load_processes)
    per_process = max(1, plan.connections // plan.load_processes)
    processes = [
        context.Process(
            target=_load_process,
            args=(
                port,
                request,
                per_process,
                plan.seconds,
                plan.warmup_seconds,
                f"{label}{i}",
                queue,
                starting.wait,
            ),
        )
        for i in range(plan.load_processes)
    ]
    for process in processes:
        process.start()
    try:
        start = starting.release()
    except threading.BrokenBarrierError:
        # A load process died (or hung) before it was ready: say which, and stop the rest.
        for process in processes:
            process.terminate()
            process.join(timeout=30)
        codes = [process.exitcode for process in processes]
        raise RuntimeError(f"load processes not ready in time (exit codes {codes})") from None
    with _reading(window, start + plan.warmup_seconds, plan.seconds):
        results = [queue.get(timeout=plan.seconds + plan.warmup_seconds + 120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    return LoadResult(
        latencies_ms=[v for result in results for v in result.latencies_ms],
        statuses=_merge([result.statuses for result in results]),
        errors=sum(result.errors for result in results),
        seconds=plan.seconds,
        acknowledged=sum(result.acknowledged for result in results),
    )


class _SharedStart:
    """One start time for every load process, announced once all of them are ready.

    Picklable into the spawned processes (two barriers and a shared double): each calls
    :meth:`wait`, the parent :meth:`release`. Two barriers because the start is known only
    once the last process is ready (``_ready``), and must be written before any process
    reads it (``_go``)."""

    def __init__(self, context: Any, processes: int) -> None:
        self._ready = context.Barrier(processes + 1)
        self._go = context.Barrier(processes + 1)
        self._start = context.Value("d", 0.0)

    def wait(self) -> float:
        self._ready.wait(READY_TIMEOUT_SECONDS)
        self._go.wait(READY_TIMEOUT_SECONDS)
        return float(self._start.value)

    def release(self) -> float:
        self._ready.wait(READY_TIMEOUT_SECONDS)
        start = time.monotonic() + START_DELAY_SECONDS
        self._start.value = start
        self._go.wait(READY_TIMEOUT_SECONDS)
        return start


@contextmanager
def _reading(window: Window | None, measure_from: float, seconds: float) -> Iterator[None]:
    """Read ``window`` at ``measure_from`` and ``seconds`` later, in a thread, while the
    block generates the load; the block waits for the last reading, and a reading that
    raised raises here (a figure without its readings must not pass for measured)."""
    if window is None:
        yield
        return
    probe = window
    failed: list[BaseException] = []

    def read() -> None:
        try:
            time.sleep(max(0.0, measure_from - time.monotonic()))
            probe.begin()
            time.sleep(max(0.0, measure_from + seconds - time.monotonic()))
            probe.end()
        except BaseException as exc:  # noqa: BLE001 - handed to the generating thread
            failed.append(exc)

    thread = threading.Thread(target=read, name="load-window", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failed:
        raise failed[0]


def summarise(result: LoadResult) -> dict[str, Any]:
    """Measured requests, requests per second, p50/p99 (ms), answers by status, errors."""
    ordered = sorted(result.latencies_ms)

    def percentile(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)

    return {
        "requests": len(ordered),
        "rps": round(len(ordered) / result.seconds, 1),
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "transport_errors": result.errors,
    }


def gunicorn(
    group: ProcessGroup,
    name: str,
    factory: str,
    workers: int,
    env: dict[str, str],
    *,
    graceful_timeout: int | None = None,
) -> tuple[ManagedProcess, int]:
    """``factory`` under gunicorn with ``ingest web``'s settings, on a free port, answering."""
    from ingest.settings import Settings
    from sandbox.processes import serve_on_free_port

    # The default, as `ingest web` runs it (the benchmarks set no INGEST_WEB_THREADS).
    threads = Settings.model_fields["web_threads"].default

    def start(port: int) -> ManagedProcess:
        argv = [
            sys.executable, "-m", "gunicorn",
            "--bind", f"127.0.0.1:{port}",
            "--workers", str(workers),
            "--threads", str(threads),
            "--worker-tmp-dir", "/dev/shm",
            "--access-logfile", "-",
            "--log-level", "info",
            "--timeout", "60",
        ]  # fmt: skip
        if graceful_timeout is not None:
            argv += ["--graceful-timeout", str(graceful_timeout)]
        argv.append(factory)
        return group.start(name, argv, env=env)

    process = serve_on_free_port(start, "/healthz")
    assert process.base_url is not None
    return process, int(process.base_url.rsplit(":", 1)[1])


# --- CPU readings -------------------------------------------------------------------------


def process_tree(process: ManagedProcess) -> list[psutil.Process]:
    """The process and every descendant it has now."""
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_seconds(process: ManagedProcess) -> float:
    """User and system CPU seconds of the process and its descendants alive now."""
    total = 0.0
    for proc in process_tree(process):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    # Linux counts guest time inside user time already: those two fields are left out.
    times = psutil.cpu_times()._asdict()
    idle = {"idle", "iowait", "guest", "guest_nice"}
    return float(sum(value for name, value in times.items() if name not in idle))


class MachineCpu:
    """CPU used by the whole machine and by the helper processes over one interval.

    Everything here shares two cores: a contender that leaves the machine saturated is
    limited by CPU, not by waiting on the CDN, and the helpers' share shows who used it.
    Helpers are the CDN and S3 server (by pid) and PostgreSQL's and Redis' server processes
    (by name, looked up at both ends: PostgreSQL forks a process per new connection).
    """

    SERVERS = {"postgres": "postgresql", "redis-server": "redis"}

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._busy = machine_busy_seconds()
        self._started = time.perf_counter()
        self._before = self._helper_times()

    def _helper_times(self) -> dict[int, tuple[str, float]]:
        labels = {pid: name for name, pid in self.pids.items()}
        found: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            name = proc.info["name"] or ""
            label = labels.get(proc.pid) or next(
                (server for prefix, server in self.SERVERS.items() if name.startswith(prefix)),
                None,
            )
            times = proc.info["cpu_times"]
            if label is not None and times is not None:
                found[proc.pid] = (label, times.user + times.system)
        return found

    def totals(self) -> tuple[float, float, dict[str, float]]:
        """Since the start: seconds elapsed, CPU seconds of the whole machine, and CPU
        seconds of each helper."""
        elapsed = time.perf_counter() - self._started
        busy = machine_busy_seconds() - self._busy
        per_label: dict[str, float] = {}
        for pid, (label, cpu) in self._helper_times().items():
            before = self._before.get(pid, (label, 0.0))[1]
            per_label[label] = per_label.get(label, 0.0) + cpu - before
        return elapsed, busy, per_label

    def report(self, items: int) -> dict[str, Any]:
        elapsed, busy, per_label = self.totals()
        return {
            "cores_busy": round(busy / elapsed, 2),
            "machine_cpu_ms_per_item": round(1000 * busy / max(items, 1), 2),
            "helpers_cpu_ms_per_item": {
                label: round(1000 * cpu / max(items, 1), 2)
                for label, cpu in sorted(per_label.items())
            },
        }
