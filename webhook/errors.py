"""Every error leaves in the seed's shape: ``{"success": false, "error": {"message": ...}}``."""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from flask import Response
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    """``body`` as JSON in the order it was written: the seed's documents put ``success``
    first, and Flask's ``jsonify`` sorts keys (its provider's default)."""
    # Otherwise as jsonify writes it: compact, ASCII-only, one trailing newline.
    text = json.dumps(body, ensure_ascii=True, separators=(",", ":"))
    return Response(f"{text}\n", status=status, mimetype="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = json_response({"success": False, "error": {"message": message}}, status)
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
    if isinstance(exc, SQLAlchemyError):
        # A database error's text can quote the row it refused (PostgreSQL's "Failing row
        # contains ..."), signed URL included: log where it failed and what kind it was only.
        log.error(
            "unhandled database error %s\n%s",
            database_error_kind(exc),
            "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
        )
    else:
        log.exception("unhandled error")
    return error_response(500, "Internal server error")


def database_error_kind(exc: SQLAlchemyError) -> str:
    """Names only, e.g. ``InternalError/ReadOnlySqlTransaction``: enough to tell a failover
    from an outage, and free of the values the error's text may quote."""
    original = exc.orig if isinstance(exc, DBAPIError) else None
    if original is None:
        return type(exc).__name__
    return f"{type(exc).__name__}/{type(original).__name__}"
