"""``GET /metrics`` in Prometheus text format."""

from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ingest import metrics

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def expose() -> Response:
    return Response(metrics.render(), mimetype=CONTENT_TYPE_LATEST)
