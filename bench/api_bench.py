"""Archive API benchmark: a 100 MB document as base64, and small lookups beside bare Flask.

``python -m bench.api_bench [--tiny] [--output PATH]`` prints one JSON line and writes
``bench/results/api.json``.

1. Large: a stored 100 MB document served by ``GET /api/chat/base64/...`` from a real
   gunicorn process (the same factory and settings as ``ingest web``), on PostgreSQL with
   the rate limit counted in Redis (``--embedded``: SQLite and in-process counters) and local
   files. While it streams, the RSS of every gunicorn worker is sampled with psutil; the
   goal is growth under 32 MB. Its throughput (raw MB/s) is set against
   ``base64.b64encode`` over the same bytes read from the same store in the same run; the
   goal is at least 0.8 of it. The client reads the body in 1 MiB pieces and keeps none.
2. Small: a 50 KB image looked up as base64 at 16 keep-alive connections (the generator
   reconnects whenever the server closes one), requests per second and p99, beside a bare
   Flask endpoint returning the same body from memory under the same gunicorn settings.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, Response

from bench.harness import Request, generate_load, gunicorn, summarise

RESULTS = Path(__file__).parent / "results"
MiB = 1024 * 1024
INSTANCE = "bench"
GOAL_RSS_MB = 32.0
GOAL_THROUGHPUT_RATIO = 0.8
SMALL_BYTES = 50 * 1024
DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Plan:
    document_bytes: int
    repeats: int  # large transfers (and baselines); the best of each is kept
    seconds: float
    warmup_seconds: float
    connections: int
    load_processes: int
    web_workers: int


FULL = Plan(
    document_bytes=100 * 1000 * 1000,
    repeats=3,
    seconds=8.0,
    warmup_seconds=1.5,
    connections=16,
    load_processes=2,
    web_workers=4,
)
TINY = Plan(
    document_bytes=4 * MiB,
    repeats=1,
    seconds=1.0,
    warmup_seconds=0.2,
    connections=4,
    load_processes=0,
    web_workers=1,
)


# --- the applications gunicorn loads -----------------------------------------------------


def ingest_app() -> Flask:
    """The real app, configured from ``INGEST_*`` exactly as ``ingest web`` does."""
    from cli.service import configure_logging
    from webhook.app import create_app

    configure_logging(os.environ.get("INGEST_LOG_LEVEL", "INFO"))
    return create_app()


def bare_app() -> Flask:
    """The baseline: the same 50 KB base64 body from memory, no token, no SQL, no storage."""
    from cli.service import configure_logging

    configure_logging(os.environ.get("INGEST_LOG_LEVEL", "INFO"))
    body = json.dumps(
        {
            "success": True,
            "message": "Base64 retrieved successfully",
            "message_id": "wamid.small",
            "mime_type": "image/jpeg",
            "media_type": "image",
            "base64": base64.b64encode(_pattern(SMALL_BYTES)).decode(),
        }
    ).encode()
    app = Flask("bare")

    @app.get("/api/chat/base64/<instance>")
    def lookup(instance: str) -> Response:
        return Response(body, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    return app


# --- data -----------------------------------------------------------------------------


def _pattern(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB, incompressible-ish
    return (block * (size // len(block) + 1))[:size]


class _Generated:
    """A read-only stream of ``size`` deterministic bytes; nothing is held whole."""

    def __init__(self, size: int, block: bytes) -> None:
        self._block = block
        self._left = size
        self._turn = 0

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = MiB if n is None or n < 0 else min(n, MiB)
        n = min(n, self._left)
        rotation = self._turn % 997
        self._turn += 1
        piece = (self._block[rotation:] + self._block[:rotation])[:n]
        self._left -= n
        return piece


def _sha256_of(make: Any) -> str:
    digest = hashlib.sha256()
    stream = make()
    while chunk := stream.read(MiB):
        digest.update(chunk)
    return digest.hexdigest()


def _prepare(workdir: Path, plan: Plan, database_url: str) -> dict[str, str]:
    """Store both media, register their rows and a token in the (migrated) database."""
    from ingest import accounts
    from ingest.models import MediaItem, MediaState, Provider, utcnow
    from ingest.secrets import generate_key, secret_box
    from ingest.services import Services
    from ingest.settings import Settings

    var = workdir / "var"
    var.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        var_dir=var,
        database_url=database_url,
        broker_url="memory://",
        storage_url=(var / "media").as_uri(),
        # A server database needs one; the web processes get it too (returned below).
        secret_key=generate_key(),
    )
    services = Services.from_settings(settings)
    try:
        # The same random block feeds both passes (hash, then store), so the bytes match.
        random_block = os.urandom(MiB)

        def document() -> Any:
            return _Generated(plan.document_bytes, random_block)

        document_sha = _sha256_of(document)
        small = _pattern(SMALL_BYTES, seed=2)
        small_sha = hashlib.sha256(small).hexdigest()
        services.storage.put(
            "bench/document/big",
            document(),
            size=plan.document_bytes,
            sha256=document_sha,
            content_type="application/pdf",
        )
        services.storage.put(
            "bench/image/small",
            io.BytesIO(small),
            size=len(small),
            sha256=small_sha,
            content_type="image/jpeg",
        )
        now = utcnow()
        with services.sessions.begin() as session:
            instance = accounts.add_instance(
                session,
                accounts.InstanceSpec(
                    name=INSTANCE,
                    provider=Provider.CLOUD,
                    phone_number_id="109876543210",
                    api_key="bench-api-key",
                    app_secret="bench-app-secret",
                ),
                secret_box(settings),
            )
            token = accounts.create_token(session, account=accounts.DEFAULT_ACCOUNT)
            for message_id, key, kind, mime, size, sha in (
                ("wamid.big", "bench/document/big", "document", "application/pdf",
                 plan.document_bytes, document_sha),
                ("wamid.small", "bench/image/small", "image", "image/jpeg", len(small), small_sha),
            ):  # fmt: skip
                session.add(
                    MediaItem(
                        instance_id=instance.id,
                        message_id=message_id,
                        media_id=message_id,
                        media_type=kind,
                        declared_mime=mime,
                        actual_mime=mime,
                        actual_sha256=sha,
                        size=size,
                        state=MediaState.STORED,
                        storage_backend=services.storage.backend,
                        storage_key=key,
                        received_at=now,
                        stored_at=now,
                        expires_at=now + timedelta(days=7),
                        next_attempt_at=now,
                    )
                )
    finally:
        services.close()
    assert settings.secret_key is not None
    return {
        "storage_url": settings.storage_url,
        "secret_key": settings.secret_key.get_secret_value(),
        "var": str(var),
        "token": token,
        "document_sha": document_sha,
    }


# --- measurements --------------------------------------------------------------------------


def baseline_b64encode(storage_url: str, key: str) -> float:
    """Seconds to read the object from the store and ``base64.b64encode`` it (in this process)."""
    from ingest.storage import storage_from_settings

    class _Url:
        def __init__(self, url: str) -> None:
            self.storage_url = url
            self.s3_endpoint_url = None

    storage = storage_from_settings(_Url(storage_url))  # type: ignore[arg-type]
    began = time.perf_counter()
    with storage.open(key) as stream:
        data = stream.read()
    encoded = base64.b64encode(data)
    elapsed = time.perf_counter() - began
    assert len(encoded) == 4 * ((len(data) + 2) // 3)
    del data, encoded
    return elapsed


def _worker_pids(master_pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(master_pid).children(recursive=True)]


class RssSampler:
    """Samples the RSS of the given processes every few milliseconds; keeps each one's peak."""

    def __init__(self, pids: list[int], interval: float = 0.002) -> None:
        import psutil

        self._processes = [psutil.Process(pid) for pid in pids]
        self.before = {p.pid: p.memory_info().rss for p in self._processes}
        self.peak = dict(self.before)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for process in self._processes:
                rss = process.memory_info().rss
                if rss > self.peak[process.pid]:
                    self.peak[process.pid] = rss
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        growth: int = max(self.peak[pid] - self.before[pid] for pid in self.before)
        return growth / MiB


def fetch_large(port: int, path: str, token: str, verify_sha: str | None) -> tuple[float, int]:
    """GET the base64 document, reading 1 MiB at a time; seconds and body bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    digest = hashlib.sha256() if verify_sha else None
    began = time.perf_counter()
    conn.request("GET", path, headers={"token": token})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"large lookup answered {response.status}: {response.read()[:300]!r}")
    received = 0
    carry = b""
    in_base64 = False
    while chunk := response.read(MiB):
        received += len(chunk)
        if digest is not None:
            # Decode the "base64" member on the fly (it is the last one, before '"}').
            if not in_base64:
                marker = chunk.find(b'"base64":"')
                if marker >= 0:
                    in_base64 = True
                    chunk = chunk[marker + len(b'"base64":"') :]
                else:
                    continue
            data = carry + chunk.split(b'"', 1)[0]
            usable = len(data) - len(data) % 4
            digest.update(base64.b64decode(data[:usable]))
            carry = data[usable:]
    if digest is not None:
        digest.update(base64.b64decode(carry))
    elapsed = time.perf_counter() - began
    declared = int(response.getheader("Content-Length") or -1)
    conn.close()
    if declared != received:
        raise RuntimeError(f"large lookup body was {received} bytes, declared {declared}")
    if digest is not None and digest.hexdigest() != verify_sha:
        raise RuntimeError("large lookup did not decode to the stored bytes")
    return elapsed, received


# --- the run -------------------------------------------------------------------------------


def run(plan: Plan, database_server: str | None, redis_url: str | None) -> dict[str, Any]:
    """PostgreSQL and Redis (the production shape) when given, else the embedded defaults."""
    from ingest import migrate
    from sandbox.processes import QUICK_STOP_SECONDS, ProcessGroup
    from sandbox.stacks import create_postgres_database

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="api-bench-")))
        if database_server:
            database_url, drop = create_postgres_database(database_server)
            stack.callback(drop)
        else:
            (workdir / "var").mkdir()
            database_url = f"sqlite:///{workdir / 'var' / 'ingest.sqlite3'}"
            migrate.upgrade(database_url)
        prepared = _prepare(workdir, plan, database_url)
        token = prepared["token"]
        env = {
            "INGEST_DATABASE_URL": database_url,
            "INGEST_BROKER_URL": "memory://",
            "INGEST_VAR_DIR": prepared["var"],
            "INGEST_STORAGE_URL": prepared["storage_url"],
            "INGEST_SECRET_KEY": prepared["secret_key"],
            "INGEST_LOG_LEVEL": "INFO",
            # The limit is the seed's contract, not what is measured here.
            "INGEST_API_RATE_LIMIT": "1000000/minute",
            "INGEST_BASE64_MAX_BYTES": str(plan.document_bytes * 2),
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        }
        if redis_url:
            # The rate limit's counters, shared by the workers: part of every lookup's cost.
            env["INGEST_REDIS_URL"] = redis_url
            env["INGEST_REDIS_PREFIX"] = f"api-bench-{os.getpid()}-{time.time_ns()}"
        (workdir / "metrics").mkdir()
        group = ProcessGroup(log_dir=workdir / "logs")
        stack.callback(group.stop_all, QUICK_STOP_SECONDS)

        # 1. Large document: throughput and worker RSS, beside the in-process baseline.
        web, port = gunicorn(
            group, "web", "bench.api_bench:ingest_app()", plan.web_workers, env, graceful_timeout=20
        )
        small_path = f"/api/chat/base64/{INSTANCE}?messageId=wamid.small"
        large_path = f"/api/chat/base64/{INSTANCE}?messageId=wamid.big"
        # Warm every worker (imports, first SQL connection) before measuring its RSS.
        for _ in range(plan.web_workers * 4):
            fetch_large(port, small_path, token, None)
        fetch_large(port, large_path, token, prepared["document_sha"])  # correctness, page cache
        transfers: list[float] = []
        growth: list[float] = []
        for _ in range(plan.repeats):
            with RssSampler(_worker_pids(web.pid)) as sampler:
                seconds, _ = fetch_large(port, large_path, token, None)
            transfers.append(seconds)
            growth.append(sampler.growth_mb)
        baselines = [
            baseline_b64encode(prepared["storage_url"], "bench/document/big")
            for _ in range(plan.repeats)
        ]
        mb = plan.document_bytes / 1e6
        served_mb_s = mb / min(transfers)
        baseline_mb_s = mb / min(baselines)
        ratio = served_mb_s / baseline_mb_s

        # 2. Small lookups, beside bare Flask under the same gunicorn settings.
        lookup = Request("GET", small_path, headers={"token": token})
        small = summarise(generate_load(port, lookup, plan))
        web.stop()
        bare, bare_port = gunicorn(
            group, "bare", "bench.api_bench:bare_app()", plan.web_workers, env, graceful_timeout=20
        )
        bare_small = summarise(generate_load(bare_port, lookup, plan))
        bare.stop()

    rss_growth = max(growth)
    small_ratio = small["rps"] / bare_small["rps"] if bare_small["rps"] else 0.0
    figures = [
        {
            "figure": f"base64 of a {mb:.0f} MB document: web worker RSS growth (MB)",
            "value": round(rss_growth, 1),
            "baseline": None,
            "ratio": None,
            "goal": f"< {GOAL_RSS_MB:.0f} MB",
            "ok": rss_growth < GOAL_RSS_MB,
        },
        {
            "figure": f"base64 of a {mb:.0f} MB document: raw MB/s served",
            "value": round(served_mb_s, 1),
            "baseline": round(baseline_mb_s, 1),
            "ratio": round(ratio, 3),
            "goal": f">= {GOAL_THROUGHPUT_RATIO} of read + b64encode",
            "ok": ratio >= GOAL_THROUGHPUT_RATIO,
        },
        {
            "figure": f"50 KB image lookups/s at {plan.connections} connections",
            "value": small["rps"],
            "baseline": bare_small["rps"],
            "ratio": round(small_ratio, 3),
            "goal": "side by side with bare Flask",
            "ok": small["statuses"].keys() == {"200"} and small["transport_errors"] == 0,
        },
        {
            "figure": f"50 KB image lookup p99 at {plan.connections} connections (ms)",
            "value": small["p99_ms"],
            "baseline": bare_small["p99_ms"],
            "ratio": (
                round(small["p99_ms"] / bare_small["p99_ms"], 3)
                if small["p99_ms"] and bare_small["p99_ms"]
                else None
            ),
            "goal": "side by side with bare Flask",
            "ok": None,
        },
    ]
    return {
        "bench": "api",
        "tiny": plan is TINY,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "plan": plan.__dict__,
        "database": "postgresql" if database_server else "sqlite",
        "rate_limit_counters": "redis" if redis_url else "in-process",
        "figures": figures,
        "large": {
            "document_bytes": plan.document_bytes,
            "transfer_seconds": [round(s, 3) for s in transfers],
            "baseline_seconds": [round(s, 3) for s in baselines],
            "rss_growth_mb": [round(g, 1) for g in growth],
        },
        "small": small,
        "bare_small": bare_small,
        "ok": all(f["ok"] is not False for f in figures[:2]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds: smoke test only")
    parser.add_argument("--output", type=Path, default=RESULTS / "api.json")
    parser.add_argument(
        "--database-server",
        default=os.environ.get("INGEST_TEST_DATABASE_URL", DEFAULT_DATABASE),
        help="PostgreSQL server URL; a scratch database is created and dropped",
    )
    parser.add_argument("--redis", default=os.environ.get("INGEST_TEST_REDIS_URL", DEFAULT_REDIS))
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="SQLite and in-process rate limit counters instead of PostgreSQL and Redis",
    )
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else FULL
    database, redis = (None, None) if args.embedded else (args.database_server, args.redis)
    result = run(plan, database, redis)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
