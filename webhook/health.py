"""Liveness and readiness probes.

Readiness means "this process can do its job", nothing more. A web process needs its
database: without it a webhook cannot be recorded (the receiver answers 503 so the provider
retries) and the archive cannot be read. It does not need the broker (it never publishes:
the relay in the workers does), Redis (the rate limit lets requests through, the error
budget is the workers') or the object store for webhooks: taking every web process out of a
load balancer during a broker blip would fail the provider's deliveries that would otherwise
succeed. Those are checked, reported in the body and in ``ingest_dependency_up``, and never
gate.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from ingest import metrics
from ingest.services import Services

bp = Blueprint("health", __name__)

# A probe answers within its caller's timeout (Kubernetes: 1 s by default) however slowly a
# reported-only dependency answers; one still pending by then is reported as a timeout.
REPORTED_CHECKS_BUDGET_SECONDS = 0.8


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    services: Services = current_app.extensions["ingest"]
    scheduler = current_app.extensions["ingest.scheduler"]

    def database() -> None:
        with services.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    reported: dict[str, Callable[[], object]] = {"storage": services.storage.check}
    ping = getattr(scheduler, "ping", None)
    if ping is not None:
        reported["broker"] = ping
    if services.redis is not None:
        reported["redis"] = services.redis.ping

    checks = {"database": _outcome(database)}
    checks.update(_run_bounded(reported))
    for name, result in checks.items():
        metrics.DEPENDENCY_UP.labels(name).set(1 if result == "ok" else 0)
    ready = checks["database"] == "ok"
    return jsonify({"status": "ok" if ready else "unavailable", "checks": checks}), (
        200 if ready else 503
    )


def _outcome(check: Callable[[], object]) -> str:
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure, it never raises
        return f"error: {type(exc).__name__}"
    return "ok"


def _run_bounded(checks: dict[str, Callable[[], object]]) -> dict[str, str]:
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="readyz")
    futures = {name: pool.submit(_outcome, check) for name, check in checks.items()}
    wait(futures.values(), timeout=REPORTED_CHECKS_BUDGET_SECONDS)
    # A check still running finishes in the background, bounded by its client's timeout.
    pool.shutdown(wait=False)
    return {
        name: future.result() if future.done() else "error: timeout"
        for name, future in futures.items()
    }
