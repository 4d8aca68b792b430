"""`ingest worker --metrics-port`: a machine with workers and no web process is scraped too."""

from __future__ import annotations

import httpx
import pytest

from sandbox.processes import INGEST, WORKER_READY_MARKER, ProcessGroup, free_port, wait_for
from sandbox.stacks import StackEnv

pytestmark = pytest.mark.e2e


def test_a_worker_serves_the_metrics_of_all_its_processes(
    stack_processes: ProcessGroup, embedded_stack: StackEnv
) -> None:
    stack_processes.env = dict(embedded_stack.env)
    port = free_port()
    worker = stack_processes.start(
        "worker",
        [INGEST, "worker", "--processes", "2", "--concurrency", "2", "--metrics-port", str(port)],
        env={"INGEST_RECONCILE_INTERVAL_SECONDS": "1"},
    )
    wait_for(worker, lambda: worker.log().count(WORKER_READY_MARKER) >= 2, "ready")

    def scraped() -> bool:
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.TransportError:
            return False
        # Written by a child's reconciler pass, served by the parent.
        return 'ingest_media_items{reason="",state="pending"}' in body

    wait_for(worker, scraped, "serving its processes' metrics")
