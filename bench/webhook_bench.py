"""Webhook receiver benchmark: signed single-image webhooks beside a bare Flask endpoint.

``python -m bench.webhook_bench [--tiny] [--output PATH]`` prints one JSON line and writes
``bench/results/webhook.json``.

Both endpoints run under gunicorn with the same settings as ``ingest web`` (threaded workers,
``INGEST_WEB_THREADS`` threads each, access log on, logging at INFO), taking turns in the
same run (``rounds`` times bare Flask then the receiver; the round with the median ratio is
reported, every round is listed), loaded by the same generator: separate processes, each
with threads holding ``http.client`` connections (re-opened whenever the server closes
them). The receiver runs against a scratch PostgreSQL database and a Redis key prefix of its
own for the run; every request is a new, signed image message.

Goals: at least 0.35 of the bare endpoint's throughput, p99 under 50 ms at 16 connections, and
every acknowledged event committed (rows are counted after the run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Flask
from sqlalchemy import func, select

from bench.harness import (
    MachineCpu,
    Request,
    generate_load,
    gunicorn,
    summarise,
    tree_cpu_seconds,
    with_overrides,
)
from ingest.intake import sign

if TYPE_CHECKING:
    from sandbox.processes import ManagedProcess

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
APP_SECRET = "bench-app-secret"
PHONE_NUMBER_ID = "109876543210"
INSTANCE = "bench"
GOAL_RATIO = 0.35
GOAL_P99_MS = 50.0
GOAL_P50_MS = 250.0  # DESIGN.md: median under 250 ms even under load


@dataclass(frozen=True)
class Plan:
    seconds: float
    warmup_seconds: float
    connections: int
    load_processes: int
    web_workers: int
    # Turns of bare Flask then the receiver. This VM's speed drifts within minutes (bare Flask
    # answered 2,077/s and 2,347/s in two runs a minute apart): one pair of phases measured
    # the drift as often as the receiver, so its ratio moved 0.21-0.30 between adjacent runs.
    # Five in a full run: three rounds of one receiver read 0.357, 0.320 and 0.266 in one run
    # and 0.298, 0.341 and 0.384 in the next, so the median of three still moved with the VM.
    rounds: int = 1


FULL = Plan(
    seconds=10.0, warmup_seconds=2.0, connections=16, load_processes=2, web_workers=4, rounds=5
)
TINY = Plan(seconds=1.0, warmup_seconds=0.3, connections=4, load_processes=1, web_workers=1)


# --- the two applications gunicorn loads -------------------------------------------------


def _logging() -> None:
    from cli.service import configure_logging

    configure_logging(os.environ.get("INGEST_LOG_LEVEL", "INFO"))


def ingest_app() -> Flask:
    """The real receiver, configured from ``INGEST_*`` like ``ingest web``."""
    from webhook.app import create_app

    _logging()
    return create_app()


def bare_app() -> Flask:
    """The baseline: the cheapest Flask POST endpoint that still reads the body."""
    from flask import request

    _logging()
    app = Flask("bare")

    @app.post("/webhook")
    def ok() -> str:
        request.get_data()
        return "ok"

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    return app


# --- requests ----------------------------------------------------------------------------


def image_body(message_id: str) -> bytes:
    """One signed-size single-image webhook, as Meta sends it (compact, ASCII)."""
    document = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "WABA-BENCH",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550001111",
                                "phone_number_id": PHONE_NUMBER_ID,
                            },
                            "contacts": [{"profile": {"name": "Bench"}, "wa_id": "15551234567"}],
                            "messages": [
                                {
                                    "from": "15551234567",
                                    "id": message_id,
                                    "timestamp": str(int(time.time())),
                                    "type": "image",
                                    "image": {
                                        # A media id is digits (Meta's form; the
                                        # receiver refuses any other).
                                        "id": str(
                                            int(hashlib.sha1(message_id.encode()).hexdigest(), 16)
                                        )[:20],
                                        "mime_type": "image/jpeg",
                                        "sha256": hashlib.sha256(message_id.encode()).hexdigest(),
                                        "caption": "bench \u00e9",
                                        "url": "https://lookaside.fbsbx.com/whatsapp_business/"
                                        "attachments/?mid=1&hash=x",
                                    },
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def signed_image(request_id: str) -> tuple[bytes, dict[str, str]]:
    """A new image message per request, signed as Meta signs it."""
    body = image_body(f"wamid.BENCH.{request_id}")
    return body, {"X-Hub-Signature-256": sign(body, APP_SECRET)}


WEBHOOK = Request(
    "POST", "/webhook", headers={"Content-Type": "application/json"}, body=signed_image
)


class RequestCpu:
    """CPU spent over the measured window, per request measured in it: the server's processes
    (gunicorn's and its workers'), PostgreSQL's, and the whole machine's, the load
    generator's included (everything shares the same cores, so the machine's CPU per
    request is what the throughput follows)."""

    def __init__(self, server: ManagedProcess) -> None:
        self.server = server
        self._machine: MachineCpu | None = None
        self._server_before = 0.0
        self._readings: dict[str, float] = {}

    def begin(self) -> None:
        self._server_before = tree_cpu_seconds(self.server)
        self._machine = MachineCpu({})

    def end(self) -> None:
        assert self._machine is not None, "end() before begin()"
        server = tree_cpu_seconds(self.server) - self._server_before
        _, machine, helpers = self._machine.totals()
        self._readings = {
            "server": server,
            "postgresql": helpers.get("postgresql", 0.0),
            "machine": machine,
        }

    def per_request_us(self, requests: int) -> dict[str, float]:
        """Microseconds a request, by part (empty when the window was never read); floats,
        which the report's headline table prints with their thousands grouped."""
        return {
            part: float(round(1e6 * seconds / max(requests, 1)))
            for part, seconds in self._readings.items()
        }


def _summary(port: int, plan: Plan, label: str, server: ManagedProcess) -> dict[str, Any]:
    cpu = RequestCpu(server)
    load = generate_load(port, WEBHOOK, plan, label, window=cpu)
    summary = summarise(load)
    return {
        **summary,
        "acknowledged_total": load.acknowledged,
        "cpu_us_per_request": cpu.per_request_us(summary["requests"]),
    }


# --- the run -----------------------------------------------------------------------------


def _register_instance(database_url: str, secret_key: str) -> None:
    from ingest import accounts
    from ingest.db import make_engine, make_session_factory
    from ingest.models import Provider
    from ingest.secrets import SecretBox

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine).begin() as session:
            accounts.add_instance(
                session,
                accounts.InstanceSpec(
                    name=INSTANCE,
                    provider=Provider.CLOUD,
                    phone_number_id=PHONE_NUMBER_ID,
                    api_key="bench-api-key",
                    app_secret=APP_SECRET,
                ),
                SecretBox([secret_key]),
            )
    finally:
        engine.dispose()


def _count_rows(database_url: str) -> int:
    from ingest.db import make_engine
    from ingest.models import MediaItem

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(MediaItem)) or 0)
    finally:
        engine.dispose()


def _latency_row(
    name: str, web: dict[str, Any], bare: dict[str, Any], goal_ms: float
) -> dict[str, Any]:
    value, baseline = web[f"{name}_ms"], bare[f"{name}_ms"]
    return {
        "figure": f"webhook {name} latency (ms)",
        "value": value,
        "baseline": baseline,
        "ratio": round(value / baseline, 2) if value and baseline else None,
        "goal": f"< {goal_ms:.0f} ms",
        "ok": value is not None and value < goal_ms,
    }


def _cpu_row(web: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """The whole machine's CPU per request, the receiver beside bare Flask: on a machine the
    load saturates, the throughput ratio follows the inverse of this one."""
    value = web["cpu_us_per_request"].get("machine")
    baseline = bare["cpu_us_per_request"].get("machine")
    return {
        "figure": "whole machine's CPU per request (us)",
        "value": value,
        "baseline": baseline,
        "ratio": round(value / baseline, 2) if value and baseline else None,
        "goal": "reported beside bare Flask",
        "ok": True,
    }


def run(plan: Plan, database_server: str, redis_url: str, tiny: bool) -> dict[str, Any]:
    from ingest.secrets import generate_key
    from sandbox.processes import QUICK_STOP_SECONDS, ProcessGroup
    from sandbox.stacks import RedisKeyspace, create_postgres_database

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="webhook-bench-")))
        database_url, drop = create_postgres_database(database_server)
        stack.callback(drop)
        keyspace = RedisKeyspace(redis_url)
        stack.callback(keyspace.release)
        # The receiver decrypts the app secret with it (a server database needs one).
        secret_key = generate_key()
        _register_instance(database_url, secret_key)
        env = {
            "INGEST_DATABASE_URL": database_url,
            "INGEST_SECRET_KEY": secret_key,
            "INGEST_BROKER_URL": redis_url,
            **keyspace.env(),
            "INGEST_VAR_DIR": str(workdir / "var"),
            "INGEST_STORAGE_URL": (workdir / "media").as_uri(),
            "INGEST_LOG_LEVEL": "INFO",
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        }
        (workdir / "metrics").mkdir()
        group = ProcessGroup(log_dir=workdir / "logs")
        stack.callback(group.stop_all, QUICK_STOP_SECONDS)

        # Side by side in one run: both served at once, loaded in turns by the same
        # generator (an idle gunicorn costs next to nothing), the baseline first each round.
        bare, bare_port = gunicorn(
            group, "bare", "bench.webhook_bench:bare_app()", plan.web_workers, env
        )
        web, web_port = gunicorn(
            group, "web", "bench.webhook_bench:ingest_app()", plan.web_workers, env
        )
        rounds: list[dict[str, Any]] = []
        for number in range(1, plan.rounds + 1):
            # The label names the requests' message ids: a new one each round, or the
            # receiver's later rounds would be repeats, inserting nothing.
            bare_result = _summary(bare_port, plan, f"bare-r{number}-", bare)
            web_result = _summary(web_port, plan, f"web-r{number}-", web)
            rounds.append(
                {
                    "bare": bare_result,
                    "webhook": web_result,
                    "ratio": (
                        round(web_result["rps"] / bare_result["rps"], 3)
                        if bare_result["rps"]
                        else 0.0
                    ),
                }
            )
        bare.stop()
        web.stop()
        # Warm-up requests were answered too: every 200, measured or not, must be a row.
        rows = _count_rows(database_url)
        refused = {status for r in rounds for status in r["webhook"]["statuses"].keys() - {"200"}}
        if not tiny and refused:
            print(f"receiver log tail:\n{web.tail()}", file=sys.stderr)

    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    bare_result, web_result, ratio = median["bare"], median["webhook"], median["ratio"]
    acknowledged = sum(r["webhook"]["acknowledged_total"] for r in rounds)
    durable = acknowledged > 0 and rows >= acknowledged
    figures = [
        {
            "figure": f"signed single-image webhooks/s at {plan.connections} connections",
            "value": web_result["rps"],
            "baseline": bare_result["rps"],
            "ratio": ratio,
            "goal": f">= {GOAL_RATIO} of bare Flask",
            "ok": ratio >= GOAL_RATIO,
        },
        _latency_row("p99", web_result, bare_result, GOAL_P99_MS),
        _latency_row("p50", web_result, bare_result, GOAL_P50_MS),
        _cpu_row(web_result, bare_result),
        {
            "figure": "acknowledged events committed (rows / 200 answers)",
            "value": rows,
            "baseline": acknowledged,
            "ratio": round(rows / acknowledged, 3) if acknowledged else None,
            "goal": "every 200 is a row",
            "ok": durable,
        },
    ]
    return {
        "bench": "webhook",
        "tiny": tiny,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "plan": asdict(plan),
        "flavour": "services",
        "bare": bare_result,
        "webhook": web_result,
        "rounds": [
            {
                "bare_rps": r["bare"]["rps"],
                "webhook_rps": r["webhook"]["rps"],
                "ratio": r["ratio"],
                "bare_p99_ms": r["bare"]["p99_ms"],
                "webhook_p99_ms": r["webhook"]["p99_ms"],
                "bare_cpu_us": r["bare"]["cpu_us_per_request"],
                "webhook_cpu_us": r["webhook"]["cpu_us_per_request"],
            }
            for r in rounds
        ],
        "rows_after_run": rows,
        "figures": figures,
        "ok": all(row["ok"] for row in figures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="a few seconds; smoke figures only")
    parser.add_argument("--output", type=Path, default=RESULTS / "webhook.json")
    parser.add_argument("--seconds", type=float, help="measured seconds per endpoint")
    parser.add_argument("--connections", type=int, help="concurrent connections")
    parser.add_argument("--workers", type=int, help="gunicorn workers (both endpoints)")
    parser.add_argument("--rounds", type=int, help="turns of bare Flask then the receiver")
    args = parser.parse_args(argv)

    plan = TINY if args.tiny else FULL
    if args.workers is None and not args.tiny:
        from ingest.settings import Settings

        plan = with_overrides(plan, web_workers=Settings().web_workers)
    plan = with_overrides(
        plan,
        seconds=args.seconds,
        connections=args.connections,
        web_workers=args.workers,
        rounds=args.rounds,
    )
    database = os.environ.get("INGEST_TEST_DATABASE_URL") or DEFAULT_DATABASE
    redis_url = os.environ.get("INGEST_TEST_REDIS_URL") or DEFAULT_REDIS
    result = run(plan, database, redis_url, args.tiny)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
