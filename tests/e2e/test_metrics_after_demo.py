"""After `ingest demo` against a service started like `make run`, both scrape targets show
every operations metric: the web's `/metrics` and a worker's `--metrics-port`."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest

from sandbox.processes import (
    INGEST,
    WORKER_READY_MARKER,
    ProcessError,
    ProcessGroup,
    child_environment,
    free_port,
    wait_for,
)
from sandbox.server import media_hosts_for
from sandbox.stacks import StackEnv

pytestmark = pytest.mark.e2e

# The families issue #15 names, each with a sample that must be there (by name and labels).
EXPECTED_SAMPLES = {
    # by state and failure reason, written by the reconciler from SQL
    "ingest_media_items": re.compile(r'^ingest_media_items\{reason="",state="stored"\} 2[01]\.0$'),
    "ingest_media_at_risk": re.compile(r'^ingest_media_at_risk\{within="1h"\} '),
    "ingest_oldest_pending_seconds": re.compile(r"^ingest_oldest_pending_seconds "),
    "ingest_queue_depth": re.compile(r'^ingest_queue_depth\{queue="media.small"\} '),
    "ingest_receipt_to_stored_seconds": re.compile(
        r'^ingest_receipt_to_stored_seconds_bucket\{le="\+Inf"\} (2[0-9]|[3-9][0-9])\.0$'
    ),
    "ingest_url_resolutions_total": re.compile(r"^ingest_url_resolutions_total\{"),
    "ingest_error_budget_blocked_total": re.compile(r"^ingest_error_budget_blocked_total\{"),
    "ingest_lease_losses_total": re.compile(r"^ingest_lease_losses_total "),
}


WORKER = [INGEST, "worker", "--processes", "1", "--concurrency", "4"]
DEMO = [INGEST, "demo", "--events", "20", "--json", "--keep"]


def _missing(body: str) -> list[str]:
    lines = body.splitlines()
    return [
        name
        for name, sample in EXPECTED_SAMPLES.items()
        if not any(sample.match(line) for line in lines)
    ]


def test_every_operations_metric_is_on_the_web_and_on_a_worker_port(
    stack_processes: ProcessGroup, embedded_stack: StackEnv
) -> None:
    group = stack_processes
    sandbox_root = group.sandbox().base_url
    assert sandbox_root is not None
    group.env = {
        **embedded_stack.env,
        "INGEST_GRAPH_URL": f"{sandbox_root}/v21.0",
        "INGEST_D360_URL": f"{sandbox_root}/d360",
        "INGEST_MEDIA_HOSTS": ",".join(media_hosts_for(sandbox_root)),
        "INGEST_RECONCILE_INTERVAL_SECONDS": "1",
    }
    web = group.web()
    metrics_port = free_port()
    worker = group.start(
        "worker",
        [*WORKER, "--metrics-port", str(metrics_port)],
        env={"INGEST_LOG_LEVEL": "INFO"},
    )
    wait_for(worker, lambda: WORKER_READY_MARKER in worker.log(), "ready")

    demo = subprocess.run(
        [*DEMO, "--url", str(web.base_url), "--sandbox", sandbox_root],
        env=child_environment(group.env),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr[-3000:] + demo.stdout[-2000:]
    summary = json.loads(demo.stdout.strip().splitlines()[-1])
    assert summary["stored"] == summary["verified"] == 20

    targets = {
        "web": f"{web.base_url}/metrics",
        "worker": f"http://127.0.0.1:{metrics_port}/metrics",
    }
    missing: dict[str, list[str]] = {}
    seen: dict[str, str] = {}

    def complete() -> bool:
        # The gauges change at the next reconciler pass (one a second here).
        missing.clear()
        for target, url in targets.items():
            answer = httpx.get(url, timeout=5)
            assert answer.status_code == 200
            seen[target] = answer.text
            if gaps := _missing(answer.text):
                missing[target] = gaps
        return not missing

    try:
        wait_for(worker, complete, "every metric on both targets", timeout=30)
    except ProcessError:
        names = {t: sorted(set(re.findall(r"^(ingest_\w+)", b, re.M))) for t, b in seen.items()}
        pytest.fail(f"missing after the demo: {missing}; present: {names}")

    content_type = httpx.get(targets["web"], timeout=5).headers["content-type"]
    assert content_type.count("charset=utf-8") == 1
    assert content_type.startswith("text/plain; version=")
