"""``make bench``: every benchmark beside its baseline, then docs/PERFORMANCE.md rewritten.

Each benchmark runs as its own process (``python -m bench.<name>``) and leaves a JSON result in
``bench/results/<name>.json``. A result may carry ``figures``: rows of ``{figure, value,
baseline, ratio, goal, ok}``; other numeric top-level entries are listed as they are. A
benchmark that fails or is missing is named in the report with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.chart import time_to_stored_chart

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DOC = ROOT / "docs" / "PERFORMANCE.md"
CHART = ROOT / "docs" / "performance-time-to-stored.png"
BENCHES = ("webhook_bench", "worker_bench", "api_bench", "storage_bench")
# Inbound rates the capacity note plans for (media per second).
RATES = (10, 100, 1000)
# Fraction of a core a worker process may use before we add another: headroom for bursts.
TARGET_CPU_SHARE = 0.6


def run_bench(name: str, tiny: bool) -> dict[str, Any]:
    """Run ``python -m bench.<name>``; its result is ``bench/results/<short name>.json``."""
    if importlib.util.find_spec(f"bench.{name}") is None:
        return {"error": f"bench/{name}.py does not exist yet"}
    output = RESULTS / f"{name.removesuffix('_bench')}.json"
    command = [sys.executable, "-m", f"bench.{name}", *(["--tiny"] if tiny else [])]
    started_wall = time.time()
    started = time.monotonic()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        tail = "\n".join((completed.stderr or completed.stdout).splitlines()[-15:])
        return {"error": f"exit status {completed.returncode}", "log_tail": tail}
    try:
        if output.stat().st_mtime < started_wall:
            return {"error": f"{output} was not rewritten by this run"}
        result: dict[str, Any] = json.loads(output.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"no readable result at {output}: {exc}"}
    result.setdefault("command", " ".join(["python", "-m", f"bench.{name}", *command[3:]]))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def table_rows(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    if "figures" in result:
        return list(result["figures"])
    rows: list[dict[str, Any]] = []
    for key, value in result.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append({"figure": key, "value": value})
        elif isinstance(value, dict) and any(k in value for k in ("ratio", "goal")):
            rows.append(
                {
                    "figure": key,
                    "value": value.get("value"),
                    "baseline": value.get("baseline"),
                    "ratio": value.get("ratio"),
                    "goal": value.get("goal"),
                    "ok": value.get("ok"),
                }
            )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "\\|")


def capacity_note(worker: dict[str, Any]) -> list[str]:
    """Processes and machines for 10, 100 and 1,000 media/s from the measured per-item cost."""
    thr = worker.get("throughput") or {}
    cpu_ms = thr.get("worker_cpu_ms_per_item")
    measured_rate = thr.get("items_per_second")
    if not cpu_ms or not measured_rate:
        return ["No worker measurement in this run: capacity cannot be derived."]
    cores = os.cpu_count() or 1
    # Results from before the bench recorded its process count ran one worker process.
    measured_processes = thr.get("worker_processes") or 1
    # One process is bounded by its CPU (the GIL: at most one core) and by its share of what
    # the measured processes reached together.
    cpu_bound_rate = 1000.0 * TARGET_CPU_SHARE / cpu_ms
    rate_per_process = min(cpu_bound_rate, measured_rate / measured_processes)
    lines = [
        f"Measured: {cpu_ms:.1f} ms of worker CPU per 100 KB item; {measured_processes} worker "
        f"process{'' if measured_processes == 1 else 'es'} with {thr.get('concurrency')} "
        f"threads in all reached {measured_rate:.0f} items/s against a 50 ms CDN. Planning "
        f"figure: {rate_per_process:.0f} items/s per process (the lower of the "
        f"measured rate per process and {TARGET_CPU_SHARE:.0%} of one core).",
        "",
        "| inbound media/s | worker processes | machines like this one "
        f"({cores} cores, one process per core) |",
        "| --- | --- | --- |",
    ]
    for rate in RATES:
        processes = max(1, -(-rate // max(int(rate_per_process), 1)))
        machines = max(1, -(-processes // cores))
        lines.append(f"| {rate} | {processes} | {machines} |")
    lines += [
        "",
        "First bottleneck, in the order they are met as the rate grows: at 10/s nothing is "
        "near a limit. Around 100/s the provider side comes first for any single number "
        "(per-number throttles and the error budget; spread numbers across workers), then the "
        "database: every item costs about four short transactions (insert, claim, finish, "
        "reconcile scan), which one PostgreSQL primary carries into the low thousands per "
        "second with connection pooling (pgbouncer) but not the SQLite embedded default. At "
        "1,000/s the broker is still far from its limit (Redis handles tens of thousands of "
        "small messages per second); the object store's per-prefix request rate (S3: 3,500 "
        "PUT/s per prefix) and the egress bandwidth (1,000 x average media size) are the next "
        "limits; keys are spread by instance and type prefixes.",
    ]
    return lines


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rounds_table(title: str, note: str, columns: Sequence[str]) -> list[str]:
    """The heading, the note and the header of a table listing every round of a bench."""
    return [
        "",
        f"## {title}",
        "",
        note,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
    ]


def webhook_rounds_note(webhook: dict[str, Any]) -> list[str]:
    """Every turn of bare Flask and the receiver, so the spread behind the median shows."""
    rounds = webhook.get("rounds") or []
    if len(rounds) < 2:
        return []
    lines = _rounds_table(
        "Webhooks, every round",
        "Bare Flask then the receiver, in turns on the same gunicorn settings and load; the "
        "table above reports the round with the median ratio. CPU is read over each measured "
        "window and divided by its requests: the server's processes (gunicorn's), "
        "PostgreSQL's, and the whole machine's, the load generator's included; the machine is "
        "saturated in both, so the ratio follows the inverse of the machine's CPU a request.",
        [
            "round",
            "bare Flask requests/s",
            "receiver requests/s",
            "ratio",
            "p99 ms: bare Flask, receiver",
            "CPU us a request, bare Flask: gunicorn, machine",
            "receiver: gunicorn, PostgreSQL, machine",
        ],
    )
    for number, r in enumerate(rounds, 1):
        bare_cpu, web_cpu = r.get("bare_cpu_us") or {}, r.get("webhook_cpu_us") or {}
        lines.append(
            f"| {number} | {r['bare_rps']:,.0f} | {r['webhook_rps']:,.0f} | {r['ratio']:.3f} | "
            f"{_num(r.get('bare_p99_ms'), 1)}, {_num(r.get('webhook_p99_ms'), 1)} | "
            f"{_cpu_cells(bare_cpu, ('server', 'machine'))} | "
            f"{_cpu_cells(web_cpu, ('server', 'postgresql', 'machine'))} |"
        )
    return lines


def _cpu_cells(cpu: dict[str, Any], parts: Sequence[str]) -> str:
    return ", ".join("-" if cpu.get(part) is None else f"{cpu[part]:,.0f}" for part in parts)


def rounds_note(worker: dict[str, Any]) -> list[str]:
    """Every round of the run, so the spread behind the median is visible."""
    rounds = worker.get("rounds") or []
    if len(rounds) < 2:
        return []
    lines = _rounds_table(
        "Worker throughput, every round",
        "Baseline, bare Celery and worker take turns; the table above reports the round with "
        "the median ratio. Everything runs on this one machine: the CDN, the S3 server (moto), "
        "PostgreSQL and Redis share its cores with the worker, while the baseline loop needs "
        "only the CDN and S3. Bare Celery is the baseline's two calls inside a Celery task on "
        "the worker's Celery configuration, pool and processes (`bench/bare_celery.py`): the "
        "gap between it and the worker is what the claim, the lease, the error budget, the "
        "checks and the SQL record cost. Cores busy is the whole machine's use while each ran.",
        [
            "round",
            "baseline items/s",
            "bare Celery items/s (ratio)",
            "worker items/s",
            "ratio",
            "CPU ms/item: loop, bare Celery, worker",
            "cores busy: baseline, bare, worker",
        ],
    )
    for number, r in enumerate(rounds, 1):
        busy = r.get("cores_busy") or {}
        lines.append(
            f"| {number} | {r['baseline_items_per_second']:.0f} | "
            f"{_num(r.get('bare_celery_items_per_second'), 0)} "
            f"({_num(r.get('bare_celery_ratio'), 2)}) | "
            f"{r['worker_items_per_second']:.0f} | {r['ratio']:.2f} | "
            f"{_num(r.get('baseline_cpu_ms_per_item'), 2)}, "
            f"{_num(r.get('bare_celery_cpu_ms_per_item'), 2)}, "
            f"{r['worker_cpu_ms_per_item']:.2f} | "
            f"{_num(busy.get('baseline'), 2)}, {_num(busy.get('bare_celery'), 2)}, "
            f"{_num(busy.get('worker'), 2)} |"
        )
    lines += cpu_note(worker)
    return lines


def cpu_note(worker: dict[str, Any]) -> list[str]:
    """Where the machine's CPU went per item in the median round, contender by contender."""
    contenders = [
        ("baseline loop", worker.get("baseline"), "cpu_ms_per_item"),
        ("bare Celery", worker.get("bare_celery"), "cpu_ms_per_item"),
        ("worker", worker.get("throughput"), "worker_cpu_ms_per_item"),
    ]
    measured = [(name, r, key) for name, r, key in contenders if r and r.get("machine")]
    if not measured:
        return []
    helpers = sorted({h for _, r, _ in measured for h in r["machine"]["helpers_cpu_ms_per_item"]})
    lines = [
        "",
        "CPU per item in the median round (ms), by process; the machine column is all CPU "
        "used on the machine while the contender ran, divided by its items:",
        "",
        "| contender | itself | " + " | ".join(helpers) + " | machine | cores busy |",
        "| --- | --- | " + " | ".join("---" for _ in helpers) + " | --- | --- |",
    ]
    for name, r, key in measured:
        machine = r["machine"]
        cells = [_num(machine["helpers_cpu_ms_per_item"].get(h), 2) for h in helpers]
        lines.append(
            f"| {name} | {_num(r.get(key), 2)} | "
            + " | ".join(cells)
            + f" | {_num(machine['machine_cpu_ms_per_item'], 2)} | "
            f"{_num(machine['cores_busy'], 2)} |"
        )
    return lines


def write_report(results: dict[str, dict[str, Any]], tiny: bool) -> str:
    machine = (
        f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Performance",
        "",
        "Written by `make bench` (`python -m bench.run_all`); do not edit by hand. Each figure "
        "is measured beside its baseline in the same run on the same machine. What they mean "
        "for the throughput goals, and what was tried: `docs/THROUGHPUT.md`.",
        "",
        f"Machine: {machine}. Date: {date}."
        + (" **Tiny mode: smoke figures only, not performance.**" if tiny else ""),
        "",
        "| benchmark | figure | value | baseline | ratio | goal | met | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    problems = []
    for name, result in results.items():
        if "error" in result:
            problems.append(f"- `{name}`: {result['error']}")
            if result.get("log_tail"):
                problems.append("  ```\n  " + result["log_tail"].replace("\n", "\n  ") + "\n  ```")
            continue
        command = result.get("command", f"python -m bench.{name}")
        for row in table_rows(name, result):
            lines.append(
                "| "
                + " | ".join(
                    [
                        name,
                        _cell(row.get("figure")),
                        _cell(row.get("value")),
                        _cell(row.get("baseline")),
                        _cell(row.get("ratio")),
                        _cell(row.get("goal")),
                        _cell(row.get("ok")),
                        f"`{command}`",
                    ]
                )
                + " |"
            )
        if result.get("flavour") == "embedded":
            problems.append(
                f"- `{name}` ran on the embedded SQLite database and broker: PostgreSQL or "
                "Redis was not reachable."
            )
    if problems:
        lines += ["", "## Not measured or degraded", "", *problems]
    lines += webhook_rounds_note(results.get("webhook_bench", {}))
    worker = results.get("worker_bench", {})
    lines += rounds_note(worker)
    chart = time_to_stored_chart(worker.get("latency") or {}, CHART)
    lines += ["", "## Time to stored under load", ""]
    if chart is not None:
        lines.append(f"![time from webhook receipt to stored]({chart.name})")
    else:
        lines.append("No latency samples in this run.")
    lines += ["", "## Capacity", "", *capacity_note(worker), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke run of every benchmark")
    parser.add_argument("--only", action="append", choices=BENCHES, help="run only these")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.only or BENCHES:
        print(f"running {name}...", file=sys.stderr, flush=True)
        results[name] = run_bench(name, args.tiny)
        status = results[name].get("error") or "ok"
        print(f"{name}: {status}", file=sys.stderr, flush=True)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(write_report(results, args.tiny))
    print(f"wrote {args.doc}", file=sys.stderr)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
