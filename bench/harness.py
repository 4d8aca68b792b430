"""What the HTTP benchmarks share: a keep-alive load generator, its summary, a gunicorn launcher.

The generator runs in separate processes (spawned, so the server under test and the client
do not share a GIL), each with threads holding one ``http.client`` connection apiece,
re-opened whenever the server closes it.
Requests before the warm-up ends are sent and answered but not measured.
"""

from __future__ import annotations

import http.client
import multiprocessing
import queue as queue_module
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

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
) -> None:
    """One generator process: ``connections`` threads, each one connection, for ``seconds``."""
    start = time.monotonic() + 0.2
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


def generate_load(port: int, request: Request, plan: LoadPlan, label: str = "load") -> LoadResult:
    """``plan.connections`` connections to ``127.0.0.1:port`` split over the load processes.

    ``plan.load_processes == 0`` runs the threads in this process instead, sparing the
    seconds a spawned process costs (smoke runs only: the client then shares our GIL).
    """
    if plan.load_processes == 0:
        inline: queue_module.Queue[LoadResult] = queue_module.Queue()
        _load_process(
            port, request, plan.connections, plan.seconds, plan.warmup_seconds, label, inline
        )
        return inline.get()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
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
            ),
        )
        for i in range(plan.load_processes)
    ]
    for process in processes:
        process.start()
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
