"""``GET /metrics`` in Prometheus text format.

Open to anyone who reaches the port unless ``INGEST_METRICS_TOKEN`` is set; then it asks for
``Authorization: Bearer <token>`` (Prometheus: ``authorization: {credentials: ...}`` in the
scrape config). The metrics carry no secret (labels are fixed codes), but they show traffic,
failure rates and queue depths to whoever reads them.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST

from ingest import metrics
from ingest.services import Services
from webhook.errors import error_response

bp = Blueprint("metrics", __name__)

INVALID_METRICS_TOKEN = "Invalid metrics token"  # noqa: S105 - an error message, not a secret


@bp.get("/metrics")
def expose() -> Response:
    services: Services = current_app.extensions["ingest"]
    expected = services.settings.metrics_token
    if expected is not None and not _bearer_matches(expected.get_secret_value()):
        response = error_response(401, INVALID_METRICS_TOKEN)
        # RFC 6750: a 401 names the scheme the client should use.
        response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    # content_type, not mimetype: the constant carries its charset, and Flask would add it again.
    return Response(metrics.render(), content_type=CONTENT_TYPE_LATEST)


def _bearer_matches(expected: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return False
    # Digests of both sides: compare_digest is constant-time only for inputs of equal length,
    # so comparing the raw values would tell a guesser the token's length.
    return hmac.compare_digest(
        hashlib.sha256(presented.encode()).digest(),
        hashlib.sha256(expected.encode()).digest(),
    )
