"""The wake-up trigger's ceiling: the receiver's write from many connections, with and without
the ``NOTIFY`` that migration 0007's trigger sent with every insert (0008 dropped it).

``python -m bench.notify_ceiling [--tiny] [--output PATH]`` prints one JSON line and writes
``bench/results/notify.json``. Not part of ``make bench``: it measures why the design changed
(``docs/ARCHITECTURE.md``, the wake-up relay), not a goal.

PostgreSQL serialises the commits of transactions that sent a notification (they queue behind
one lock), so past some rate a notifying insert waits for every other one's commit, its WAL
flush included. Two scratch databases on the same server, one migrated to 0007 (the trigger)
and one to the head (none); ``processes`` spawned processes of ``threads`` threads each call
``intake.record_webhook`` (the receiver's own write: one new single-image message, the
driver insert in autocommit) ``rows`` times per thread; the two take turns for ``rounds``
rounds. Reported per round: inserts/s and the whole machine's CPU per insert (both clients and
server run here).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.harness import machine_busy_seconds, with_overrides
from bench.webhook_bench import DEFAULT_DATABASE, INSTANCE, _register_instance, image_body

RESULTS = Path(__file__).parent / "results"
# The last revision whose trigger notified with every insert into media_items.
TRIGGER_REVISION = "0007"


@dataclass(frozen=True)
class Plan:
    processes: int
    threads: int
    rows: int  # per thread and round
    rounds: int


FULL = Plan(processes=4, threads=4, rows=250, rounds=3)
TINY = Plan(processes=1, threads=2, rows=20, rounds=1)


def _insert_rows(database_url: str, label: str, threads: int, rows: int, start: Any) -> None:
    """One client process: ``threads`` threads, each recording ``rows`` new messages once
    every process is ready (``start``, a barrier: start-up is not measured)."""
    from ingest.db import make_engine
    from ingest.events import parse_body
    from ingest.intake import RoutedEvent, record_webhook
    from ingest.settings import Settings

    settings = Settings()
    # As the web does: a connection is pinged only after sitting idle.
    engine = make_engine(database_url, ping_after_idle=5.0, pool_size=threads)
    with engine.connect() as connection:
        instance_id = connection.scalar(
            text("SELECT id FROM instances WHERE name = :name"), {"name": INSTANCE}
        )
    assert isinstance(instance_id, int)

    def insert(thread: int) -> None:
        for number in range(rows):
            event = parse_body(image_body(f"wamid.{label}.{thread}.{number}"), max_items=1)
            recorded = record_webhook(
                engine,
                engine,  # one event: the driver insert, which uses only the first engine
                [RoutedEvent(instance_id, event.media[0])],
                settings=settings,
                received_at=datetime.now(UTC),
            )
            assert recorded.new == 1

    workers = [threading.Thread(target=insert, args=(n,)) for n in range(threads)]
    start.wait()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    engine.dispose()


def _notifies(database_url: str) -> bool:
    """Does an insert into ``media_items`` fire a trigger (0007's notification)?"""
    from ingest.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            count = connection.scalar(
                text(
                    "SELECT count(*) FROM pg_trigger "
                    "WHERE tgrelid = 'media_items'::regclass AND NOT tgisinternal"
                )
            )
    finally:
        engine.dispose()
    return bool(count)


def _phase(database_url: str, plan: Plan) -> dict[str, float]:
    label = uuid.uuid4().hex[:12]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(plan.processes + 1)
    clients = [
        context.Process(
            target=_insert_rows,
            args=(database_url, f"{label}-{n}", plan.threads, plan.rows, start),
        )
        for n in range(plan.processes)
    ]
    for client in clients:
        client.start()
    start.wait(timeout=120)
    busy, started = machine_busy_seconds(), time.perf_counter()
    for client in clients:
        client.join()
    elapsed, busy = time.perf_counter() - started, machine_busy_seconds() - busy
    failed = [client.exitcode for client in clients if client.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} client process(es) failed: exit codes {failed}")
    inserts = plan.processes * plan.threads * plan.rows
    return {
        "inserts_per_second": round(inserts / elapsed),
        "machine_cpu_us_per_insert": round(1e6 * busy / inserts),
    }


def run(plan: Plan, database_server: str) -> dict[str, Any]:
    from alembic import command

    from ingest import migrate
    from ingest.secrets import generate_key
    from sandbox.stacks import create_postgres_database

    urls: dict[str, str] = {}
    with ExitStack() as stack:
        for variant in ("with_trigger", "without_trigger"):
            url, drop = create_postgres_database(database_server)
            stack.callback(drop)
            if variant == "with_trigger":
                command.downgrade(migrate.alembic_config(url), TRIGGER_REVISION)
            _register_instance(url, generate_key())
            if _notifies(url) != (variant == "with_trigger"):
                raise RuntimeError(f"{variant}: the schema is not what this bench compares")
            urls[variant] = url
        rounds = [
            {variant: _phase(url, plan) for variant, url in urls.items()}
            for _ in range(plan.rounds)
        ]

    def median(variant: str, figure: str) -> float:
        return statistics.median(r[variant][figure] for r in rounds)

    return {
        "bench": "notify_ceiling",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "plan": asdict(plan),
        "rounds": rounds,
        "median": {
            variant: {
                figure: median(variant, figure)
                for figure in ("inserts_per_second", "machine_cpu_us_per_insert")
            }
            for variant in urls
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="a few seconds; smoke figures only")
    parser.add_argument("--output", type=Path, default=RESULTS / "notify.json")
    parser.add_argument("--processes", type=int, help="client processes")
    parser.add_argument("--threads", type=int, help="threads (connections) per client process")
    parser.add_argument("--rounds", type=int, help="turns of the two databases")
    args = parser.parse_args(argv)

    plan = TINY if args.tiny else FULL
    plan = with_overrides(plan, processes=args.processes, threads=args.threads, rounds=args.rounds)
    database = os.environ.get("INGEST_TEST_DATABASE_URL") or DEFAULT_DATABASE
    result = run(plan, database)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
