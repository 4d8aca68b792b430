"""Every error leaves in the seed's shape: ``{"success": false, "error": {"message": ...}}``."""

from __future__ import annotations

import logging

from flask import Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"success": False, "error": {"message": message}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    message = {
        404: "Not found",
        405: "Method not allowed",
        413: "Request body too large",
        415: "Unsupported media type",
    }.get(status, exc.name)
    response = error_response(status, message)
    if status == 405 and exc.get_response().headers.get("Allow"):
        response.headers["Allow"] = exc.get_response().headers["Allow"]
    return response


def unexpected_error(exc: Exception) -> Response:
    # The caller learns nothing about internals; the log has the traceback.
    log.exception("unhandled error")
    return error_response(500, "Internal server error")
