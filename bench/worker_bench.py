"""Download worker benchmark: throughput beside a plain-loop baseline, memory, latency.

``python -m bench.worker_bench [--tiny]`` writes ``bench/results/worker.json``.

1. Throughput: N media of 100 KB on a local CDN (the sandbox in its own process, 50 ms per
   request) through the real ``ingest worker`` into S3 (moto server), against a baseline
   measured in the same run:
   a thread pool of the same size that GETs each URL with httpx and puts it with boto3.
   Goal: at least 0.8 of the baseline's items per second. Worker CPU per item is reported.
   ``ingest worker`` runs one Celery process per CPU by default, each with its share of the
   threads: the total concurrency is the baseline's (recorded as ``worker_processes``).
   The clock starts once every worker process is ready. Baseline, bare Celery and worker
   take turns for ``rounds`` rounds; every round is recorded and the round with the median
   ratio is reported.
   Bare Celery (``bench.bare_celery``, services flavour only) is the baseline's two calls
   inside a Celery task on the worker's Celery configuration, pool and processes: what
   Celery alone allows. For each contender the machine's busy cores and the CPU per item of
   the processes it shares them with (CDN, S3, PostgreSQL, Redis) are recorded.
2. Memory: one 100 MB document archived; the worker's peak RSS (process tree) grows by less
   than 32 MB.
3. Latency: 100 events per second for 60 s through the real receiver; p99 from webhook
   receipt (``received_at``) to ``stored_at`` under 5 s.

PostgreSQL and Redis come from ``INGEST_TEST_DATABASE_URL`` / ``INGEST_TEST_REDIS_URL`` (or
this machine's defaults); when either does not answer the run says so and falls back to the
embedded database and broker, which is recorded in the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import tenacity
from pydantic import SecretStr
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from bench.harness import MachineCpu, process_tree, tree_cpu_seconds
from cli.demo_http import resend_on_reset
from cli.demo_summary import percentile
from cli.service import thread_shares
from ingest.db import make_engine, make_session_factory
from ingest.models import MediaItem, MediaState, Provider
from ingest.queues import SMALL_MEDIA
from ingest.secrets import generate_key
from ingest.settings import Settings
from sandbox.client import SandboxControl
from sandbox.payloads import varied_message, webhook_body
from sandbox.processes import (
    QUICK_STOP_SECONDS,
    WORKER_READY_MARKER,
    ManagedProcess,
    ProcessGroup,
    child_environment,
    log_contains,
    wait_for,
)
from sandbox.provider import SandboxMedia
from sandbox.registration import DemoRegistration, register
from sandbox.stacks import (
    S3_DUMMY_CREDENTIALS,
    StackEnv,
    create_bucket,
    embedded_stack_env,
    service_stack_env,
    start_moto_server,
    stop_moto_server,
)

RESULTS = Path(__file__).parent / "results"
KB = 1024
MB = 1024 * KB
DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Plan:
    items: int
    item_bytes: int
    concurrency: int
    cdn_latency_ms: int
    big_bytes: int
    rate_per_second: int
    rate_seconds: int
    # Baseline, bare Celery and worker are measured this many times, taking turns; the round
    # with the median ratio is the headline. One round alone swings by +-15% on a small VM.
    rounds: int


FULL = Plan(1000, 100 * KB, 16, 50, 100 * MB, 100, 60, 5)
TINY = Plan(24, 100 * KB, 8, 50, 4 * MB, 10, 2, 1)


# --- environment -----------------------------------------------------------------------


def _services_available(database_url: str, redis_url: str) -> tuple[bool, list[str]]:
    missing = []
    try:
        engine = make_engine(database_url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        missing.append(f"PostgreSQL at {database_url} ({type(exc).__name__})")
    try:
        import redis

        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        missing.append(f"Redis at {redis_url} ({type(exc).__name__})")
    return not missing, missing


@contextmanager
def bench_stack(root: Path, sandbox_root: str, endpoint_url: str) -> Iterator[StackEnv]:
    database = os.environ.get("INGEST_TEST_DATABASE_URL", DEFAULT_DATABASE)
    redis_url = os.environ.get("INGEST_TEST_REDIS_URL", DEFAULT_REDIS)
    ok, missing = _services_available(database, redis_url)
    extra = {
        "INGEST_GRAPH_URL": f"{sandbox_root}/v21.0",
        "INGEST_D360_URL": f"{sandbox_root}/d360",
        "INGEST_API_RATE_LIMIT": "1000000/minute",
        "INGEST_LOG_LEVEL": "WARNING",
        # Encrypts the registered instance's secrets; a server database needs one.
        "INGEST_SECRET_KEY": generate_key(),
    }
    if ok:
        stack = service_stack_env(database, redis_url, endpoint_url, **extra)
    else:
        print("worker_bench: missing " + "; ".join(missing) + ": using SQLite", file=sys.stderr)
        bucket = f"ingest-bench-{uuid.uuid4().hex[:12]}"
        create_bucket(endpoint_url, bucket)
        stack = embedded_stack_env(
            root,
            INGEST_STORAGE_URL=f"s3://{bucket}/media",
            INGEST_S3_ENDPOINT_URL=endpoint_url,
            **S3_DUMMY_CREDENTIALS,
            **extra,
        )
        stack.storage_url = f"s3://{bucket}/media"
    try:
        yield stack
    finally:
        stack.close()


def _rss(process: ManagedProcess) -> int:
    total = 0
    for proc in process_tree(process):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class RssSampler:
    """Peak RSS of a process tree, sampled every 20 ms in a thread."""

    def __init__(self, process: ManagedProcess) -> None:
        self.process = process
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss(self.process))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- scenario helpers ------------------------------------------------------------------


class Poster:
    """Posts signed Cloud API webhooks for one registered instance."""

    def __init__(self, web_url: str, reg: DemoRegistration) -> None:
        self.web_url = web_url
        self.reg = reg
        self.http = httpx.Client(timeout=30.0)
        self.count = 0
        # Webhooks sent again because a connection was reset before any answer.
        self.resent = 0
        # Once, as before: a second reset in a row is a server problem the run should show.
        self._resend_on_reset = resend_on_reset.copy(
            stop=tenacity.stop_after_attempt(2), before_sleep=self._count_resent
        )

    def post(self, media: SandboxMedia) -> str:
        self.count += 1
        wamid = f"wamid.BENCH{uuid.uuid4().hex.upper()}"
        body = webhook_body(
            self.reg.phone_number_id, varied_message(media, wamid, "15551230000", self.count)
        )
        assert self.reg.app_secret is not None
        path, headers = self.reg.webhook_route(body)
        # A kept-alive connection the server closed as it was reused: sent again, as a
        # provider does with a webhook left unanswered (recording is idempotent).
        response = self._resend_on_reset(
            self.http.post, f"{self.web_url}{path}", content=body, headers=headers
        )
        response.raise_for_status()
        return wamid

    def _count_resent(self, _attempt: object) -> None:
        self.resent += 1

    def close(self) -> None:
        self.http.close()


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A session on an engine of its own, disposed after: the benchmark's reads and resets."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


_FINISHED = MediaItem.state.in_([MediaState.STORED, MediaState.FAILED])


def _wait_stored(settings: Settings, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    with _session(settings) as session:
        while True:
            done = int(session.scalar(select(func.count()).where(_FINISHED)) or 0)
            session.rollback()  # the next count sees rows committed since
            if done >= expected or time.monotonic() > deadline:
                return done
            time.sleep(0.1)


def _last_finished_at(settings: Settings) -> datetime | None:
    """When the last finished row was written: the end of a drain, without polling's lag."""
    with _session(settings) as session:
        return session.scalar(select(func.max(MediaItem.updated_at)).where(_FINISHED))


def _finished_before(settings: Settings, moment: datetime) -> int:
    with _session(settings) as session:
        return int(
            session.scalar(select(func.count()).where(_FINISHED, MediaItem.updated_at < moment))
            or 0
        )


def _timestamps(settings: Settings) -> list[tuple[datetime, datetime | None, str]]:
    with _session(settings) as session:
        rows = session.execute(
            select(MediaItem.received_at, MediaItem.stored_at, MediaItem.state)
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def _truncate_media(settings: Settings) -> None:
    with _session(settings) as session:
        session.execute(delete(MediaItem))
        session.commit()


# --- scenarios -------------------------------------------------------------------------


def _bucket(stack: StackEnv) -> str:
    return stack.storage_url.removeprefix("s3://").split("/", 1)[0]


def baseline(
    control: SandboxControl,
    phone: str,
    api_key: str,
    plan: Plan,
    stack: StackEnv,
    helpers: dict[str, int],
) -> dict[str, Any]:
    """The plain loop: GET with httpx, put_object with boto3, same concurrency."""
    import boto3

    media = [control.add_media(phone, "image", plan.item_bytes) for _ in range(plan.items)]
    bucket = _bucket(stack)
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["INGEST_S3_ENDPOINT_URL"],
        aws_access_key_id=S3_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    http = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=plan.concurrency * 2))

    def copy(item: SandboxMedia) -> None:
        response = http.get(item.url, headers={"Authorization": f"Bearer {api_key}"})
        response.raise_for_status()
        s3.put_object(Bucket=bucket, Key=f"baseline/{item.media_id}", Body=response.content)

    # This process runs nothing else meanwhile (the CDN and S3 are other processes), so its
    # CPU time is the loop's: the baseline for the worker's CPU per item.
    cpu_before = time.process_time()
    machine = MachineCpu(helpers)
    started = time.perf_counter()
    with ThreadPoolExecutor(plan.concurrency) as pool:
        list(pool.map(copy, media))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    http.close()
    s3.close()
    return {
        "items": plan.items,
        "seconds": elapsed,
        "items_per_second": plan.items / elapsed,
        "cpu_ms_per_item": 1000 * cpu / plan.items,
        "machine": machine.report(plan.items),
    }


def bare_celery(
    group: ProcessGroup,
    control: SandboxControl,
    reg: DemoRegistration,
    plan: Plan,
    stack: StackEnv,
    helpers: dict[str, int],
    workdir: Path,
) -> dict[str, Any]:
    """The baseline's work as a Celery task (bench.bare_celery), with the worker's processes."""
    import redis

    media = [
        control.add_media(reg.phone_number_id, "image", plan.item_bytes) for _ in range(plan.items)
    ]
    plan_file = workdir / f"bare-plan-{uuid.uuid4().hex[:8]}.json"
    plan_file.write_text(json.dumps([[m.url, f"bare/{m.media_id}"] for m in media]))
    prefix = f"{stack.env['INGEST_BROKER_PREFIX']}:bare-{uuid.uuid4().hex[:8]}"
    counter = f"{prefix}:copied"
    env = {
        # A queue of its own: a worker of the service still running would not know the task.
        "INGEST_BROKER_PREFIX": prefix,
        "BENCH_BARE_PLAN": str(plan_file),
        "BENCH_BARE_BUCKET": _bucket(stack),
        "BENCH_BARE_API_KEY": reg.api_key,
        "BENCH_BARE_COUNTER": counter,
        "INGEST_LOG_LEVEL": "INFO",
    }
    subprocess.run(
        [sys.executable, "-m", "bench.bare_celery", str(plan.items)],
        env=child_environment({**group.env, **env}),
        check=True,
        timeout=120,
    )
    count = min(os.cpu_count() or 1, plan.concurrency)
    processes = [
        group.start(
            "bare-celery",
            [
                *(sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker"),
                *("--loglevel=INFO", "--pool=threads", f"--concurrency={share}"),
                *(f"--queues={SMALL_MEDIA}", "--without-gossip", "--without-mingle"),
                f"--hostname=bare{n + 1}@%h",
            ],
            env=env,
        )
        # As ``ingest worker`` shares its threads out over its processes.
        for n, share in enumerate(thread_shares(plan.concurrency, count))
    ]
    try:
        for process in processes:
            wait_for(process, log_contains(process, WORKER_READY_MARKER), "ready")
        client = redis.Redis.from_url(stack.env["INGEST_REDIS_URL"])
        cpu_before = sum(tree_cpu_seconds(p) for p in processes)
        machine = MachineCpu(helpers)
        started = time.perf_counter()
        # Copied before every process was ready: left out, as in the worker's round.
        before_clock = int(client.get(counter) or 0)
        deadline = time.monotonic() + 600
        copied = 0
        while copied < plan.items and time.monotonic() < deadline:
            time.sleep(0.02)
            copied = int(client.get(counter) or 0)
            for process in processes:
                if not process.alive():
                    raise process.fail("exited during the bare Celery round")
        elapsed = time.perf_counter() - started
        if copied < plan.items:
            raise processes[0].fail(f"copied {copied} of {plan.items} within 600 s")
        cpu = sum(tree_cpu_seconds(p) for p in processes) - cpu_before
        timed = copied - before_clock
        machine_report = machine.report(timed)
        client.close()
    finally:
        for process in processes:
            process.stop(QUICK_STOP_SECONDS)
    return {
        "items": plan.items,
        "done": copied,
        "done_before_the_clock": before_clock,
        "seconds": elapsed,
        "items_per_second": timed / elapsed,
        "cpu_ms_per_item": 1000 * cpu / max(timed, 1),
        "processes": count,
        "machine": machine_report,
    }


def throughput(
    group: ProcessGroup,
    poster: Poster,
    control: SandboxControl,
    settings: Settings,
    plan: Plan,
    helpers: dict[str, int],
) -> tuple[dict[str, Any], ManagedProcess]:
    """Rows are created first; then one worker drains them, timed from its readiness.

    Its relay publishes the backlog as soon as its first process starts, so a few rows may
    be finished before every process is ready and the clock starts: those are left out of
    the rate and the CPU per item, which cover the same interval (bare Celery alike)."""
    media = [
        control.add_media(poster.reg.phone_number_id, "image", plan.item_bytes)
        for _ in range(plan.items)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(poster.post, media))
    # Readiness is polled every 0.1 s, so the first tasks may start up to that much before the
    # clock: a bias of about 2% in favour of the worker (and of bare Celery, started alike).
    worker = group.worker(concurrency=plan.concurrency, queues="media.small,media.large")
    cpu_before = tree_cpu_seconds(worker)
    machine = MachineCpu(helpers)
    started_at = datetime.now(UTC)
    done = _wait_stored(settings, plan.items, timeout=600)
    # The drain ended when the last row was written, not when the 0.1 s poll noticed.
    finished_at = _last_finished_at(settings) or datetime.now(UTC)
    elapsed = (finished_at - started_at).total_seconds()
    cpu = tree_cpu_seconds(worker) - cpu_before
    before_clock = _finished_before(settings, started_at)
    timed = done - before_clock
    machine_report = machine.report(timed)
    return (
        {
            "items": plan.items,
            "done": done,
            "done_before_the_clock": before_clock,
            "seconds": elapsed,
            "items_per_second": timed / elapsed,
            "worker_cpu_ms_per_item": 1000 * cpu / max(timed, 1),
            "concurrency": plan.concurrency,
            "worker_processes": min(os.cpu_count() or 1, plan.concurrency),
            "machine": machine_report,
        },
        worker,
    )


def memory(
    worker: ManagedProcess, poster: Poster, control: SandboxControl, settings: Settings, plan: Plan
) -> dict[str, Any]:
    already = _wait_stored(settings, 0, timeout=0)
    before = _rss(worker)
    big = control.add_media(poster.reg.phone_number_id, "document", plan.big_bytes)
    with RssSampler(worker) as sampler:
        poster.post(big)
        done = _wait_stored(settings, already + 1, timeout=600)
    growth = max(sampler.peak - before, 0)
    return {
        "document_bytes": plan.big_bytes,
        "stored": done > already,
        "rss_before_mb": before / MB,
        "rss_peak_mb": sampler.peak / MB,
        "rss_growth_mb": growth / MB,
        "goal_mb": 32,
        "ok": done > already and growth < 32 * MB,
    }


def latency(
    poster: Poster, control: SandboxControl, settings: Settings, plan: Plan
) -> dict[str, Any]:
    """Paced webhooks at a fixed rate; p99 of received_at -> stored_at."""
    _truncate_media(settings)
    total = plan.rate_per_second * plan.rate_seconds
    media = [control.add_media(poster.reg.phone_number_id, "image", 20 * KB) for _ in range(total)]
    interval = 1.0 / plan.rate_per_second
    started = time.perf_counter()
    lag = 0.0
    with ThreadPoolExecutor(16) as pool:
        futures = []
        for n, item in enumerate(media):
            due = started + n * interval
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                lag = max(lag, -delay)
            futures.append(pool.submit(poster.post, item))
        for future in futures:
            future.result()
    _wait_stored(settings, total, timeout=120)
    rows = _timestamps(settings)
    seconds = sorted((s - r).total_seconds() for r, s, _ in rows if s is not None)
    p99 = percentile(seconds, 99)
    return {
        "events": total,
        "rate_per_second": plan.rate_per_second,
        "stored": len(seconds),
        "max_send_lag_seconds": lag,
        "p50_seconds": percentile(seconds, 50),
        "p95_seconds": percentile(seconds, 95),
        "p99_seconds": p99,
        "goal_p99_seconds": 5.0,
        "ok": p99 is not None and p99 < 5.0 and len(seconds) == total,
        "samples": seconds,
    }


# --- main ------------------------------------------------------------------------------


def run(plan: Plan, tiny: bool) -> dict[str, Any]:
    import tempfile

    result: dict[str, Any] = {
        "benchmark": "worker",
        "tiny": tiny,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu "
        f"{psutil.virtual_memory().total // MB} MB",
        "command": "python -m bench.worker_bench" + (" --tiny" if tiny else ""),
        "plan": plan.__dict__,
    }
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="worker-bench-")))
        moto, endpoint_url = start_moto_server()
        stack.callback(stop_moto_server, moto)
        # The CDN runs in its own process: inside this one it would share the GIL with the
        # baseline's threads and slow the baseline down (by about a fifth, measured).
        cdn_group = ProcessGroup(log_dir=root / "logs", env={})
        stack.callback(cdn_group.stop_all, QUICK_STOP_SECONDS)
        cdn = cdn_group.sandbox(latency_ms=plan.cdn_latency_ms)
        sandbox_root = cdn.base_url
        assert sandbox_root is not None
        helpers = {"cdn": cdn.pid, "s3 (moto)": moto.pid}
        control = SandboxControl(sandbox_root)
        stack.callback(control.close)
        env = stack.enter_context(bench_stack(root, sandbox_root, endpoint_url))
        result["flavour"] = env.flavour
        # The bench's process registers the instance with the stack's key.
        settings = env.settings().model_copy(
            update={"secret_key": SecretStr(env.env["INGEST_SECRET_KEY"])}
        )
        reg = register(settings, Provider.CLOUD)
        control.add_number(reg.phone_number_id, reg.api_key)

        group = ProcessGroup(log_dir=root / "logs", env=env.env)
        stack.callback(group.stop_all, QUICK_STOP_SECONDS)
        web = group.web(workers=2)
        assert web.base_url is not None
        poster = Poster(web.base_url, reg)
        stack.callback(poster.close)

        rounds: list[dict[str, Any]] = []
        worker: ManagedProcess | None = None
        for _ in range(plan.rounds):
            if worker is not None:
                worker.stop(QUICK_STOP_SECONDS)
                _truncate_media(settings)
            base = baseline(control, reg.phone_number_id, reg.api_key, plan, env, helpers)
            bare = (
                bare_celery(group, control, reg, plan, env, helpers, root)
                if env.flavour == "services"
                else None
            )
            measured, worker = throughput(group, poster, control, settings, plan, helpers)
            ratio = measured["items_per_second"] / base["items_per_second"]
            if bare is not None:
                bare["ratio_to_baseline"] = bare["items_per_second"] / base["items_per_second"]
            rounds.append(
                {
                    "baseline": base,
                    "bare_celery": bare,
                    "throughput": {**measured, "ratio_to_baseline": ratio},
                }
            )
        result["rounds"] = [_round_summary(r) for r in rounds]
        median = sorted(rounds, key=lambda r: r["throughput"]["ratio_to_baseline"])[
            len(rounds) // 2
        ]
        result["baseline"] = median["baseline"]
        result["bare_celery"] = median["bare_celery"]
        result["throughput"] = median["throughput"]
        ratio = result["throughput"]["ratio_to_baseline"]
        result["throughput"]["goal_ratio"] = 0.8
        result["throughput"]["ok"] = ratio >= 0.8
        assert worker is not None
        result["memory"] = memory(worker, poster, control, settings, plan)
        group.beat()
        result["latency"] = latency(poster, control, settings, plan)
        result["webhooks_resent_after_a_reset"] = poster.resent
    result["figures"] = figures(result)
    return result


def _round_summary(r: dict[str, Any]) -> dict[str, Any]:
    bare = r["bare_celery"] or {}
    return {
        "baseline_items_per_second": r["baseline"]["items_per_second"],
        "bare_celery_items_per_second": bare.get("items_per_second"),
        "bare_celery_ratio": bare.get("ratio_to_baseline"),
        "worker_items_per_second": r["throughput"]["items_per_second"],
        "ratio": r["throughput"]["ratio_to_baseline"],
        "worker_cpu_ms_per_item": r["throughput"]["worker_cpu_ms_per_item"],
        "bare_celery_cpu_ms_per_item": bare.get("cpu_ms_per_item"),
        "baseline_cpu_ms_per_item": r["baseline"]["cpu_ms_per_item"],
        "cores_busy": {
            "baseline": r["baseline"]["machine"]["cores_busy"],
            "bare_celery": bare.get("machine", {}).get("cores_busy"),
            "worker": r["throughput"]["machine"]["cores_busy"],
        },
    }


def _against_baseline(
    figure: str, contender: dict[str, Any], base: dict[str, Any], *, goal: str, ok: bool | None
) -> dict[str, Any]:
    return {
        "figure": figure,
        "value": round(contender["items_per_second"], 1),
        "baseline": round(base["items_per_second"], 1),
        "baseline_name": "httpx GET + boto3 put_object loop, same concurrency",
        "ratio": round(contender["ratio_to_baseline"], 2),
        "goal": goal,
        "ok": ok,
    }


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows ``bench.run_all`` puts in docs/PERFORMANCE.md (one shape for every bench)."""
    thr, mem, lat = result["throughput"], result["memory"], result["latency"]
    rows = [
        _against_baseline(
            "worker throughput, 100 KB media from a 50 ms CDN to S3 (items/s)",
            thr,
            result["baseline"],
            goal=">= 0.8 of baseline",
            ok=thr["ok"],
        )
    ]
    if result.get("bare_celery") is not None:
        rows.append(
            _against_baseline(
                "bare Celery task doing only the baseline's GET + put (items/s)",
                result["bare_celery"],
                result["baseline"],
                goal="reference: what Celery alone allows",
                ok=None,
            )
        )
    return [
        *rows,
        {
            "figure": "worker CPU per item (ms)",
            "value": round(thr["worker_cpu_ms_per_item"], 2),
            "baseline": round(result["baseline"]["cpu_ms_per_item"], 2),
            "baseline_name": "CPU of the baseline loop per item",
            "ratio": round(
                thr["worker_cpu_ms_per_item"] / result["baseline"]["cpu_ms_per_item"], 2
            ),
            "goal": "reported",
            "ok": True,
        },
        {
            "figure": f"worker peak RSS growth archiving a {mem['document_bytes'] // MB} MB "
            "document (MB)",
            "value": round(mem["rss_growth_mb"], 1),
            "baseline": None,
            "ratio": None,
            "goal": "< 32 MB",
            "ok": mem["ok"],
        },
        {
            "figure": f"webhook receipt to stored, p99 at {lat['rate_per_second']} events/s (s)",
            "value": None if lat["p99_seconds"] is None else round(lat["p99_seconds"], 2),
            "baseline": None,
            "ratio": None,
            "goal": "< 5 s",
            "ok": lat["ok"],
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for the test suite")
    parser.add_argument("--output", type=Path, default=RESULTS / "worker.json")
    args = parser.parse_args(argv)
    result = run(TINY if args.tiny else FULL, args.tiny)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = {k: v for k, v in result.items() if k != "latency"}
    summary["latency"] = {k: v for k, v in result["latency"].items() if k != "samples"}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
