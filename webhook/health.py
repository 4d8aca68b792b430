"""Liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from ingest.services import Services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    services: Services = current_app.extensions["ingest"]
    scheduler = current_app.extensions["ingest.scheduler"]
    checks: dict[str, str] = {}

    try:
        with services.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure, it never raises
        checks["database"] = f"error: {type(exc).__name__}"

    try:
        services.storage.check()
        checks["storage"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["storage"] = f"error: {type(exc).__name__}"

    ping = getattr(scheduler, "ping", None)
    if ping is not None:
        try:
            ping()
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["broker"] = f"error: {type(exc).__name__}"

    if services.redis is not None:
        try:
            services.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["redis"] = f"error: {type(exc).__name__}"

    ready = all(value == "ok" for value in checks.values())
    return jsonify({"status": "ok" if ready else "unavailable", "checks": checks}), (
        200 if ready else 503
    )
