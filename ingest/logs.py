"""Log line formats: the default text line, or one JSON object per line (INGEST_LOG_FORMAT).

Context that belongs on every line of a unit of work (a web request's id, a task's id and
its row) lives in context variables: the adapters (webhook/, tasks/) set them, and the
formatter reads them, so no call site has to repeat them. Values set here are ids and
codes only: never a URL, token or secret.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
FORMATS = ("text", "json")

REQUEST_ID: ContextVar[str | None] = ContextVar("ingest_request_id", default=None)
TASK_ID: ContextVar[str | None] = ContextVar("ingest_task_id", default=None)
MEDIA_ITEM_ID: ContextVar[int | None] = ContextVar("ingest_media_item_id", default=None)

_CONTEXT: tuple[tuple[str, ContextVar[Any]], ...] = (
    ("request_id", REQUEST_ID),
    ("task_id", TASK_ID),
    ("media_item_id", MEDIA_ITEM_ID),
)
# A client's X-Request-Id is kept only if it is a short token that cannot forge or garble
# a log line; anything else is replaced by one of ours.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_from(header: str | None) -> str:
    """The client's request id if it is a short safe token, else a fresh one."""
    if header is not None and _SAFE_REQUEST_ID.fullmatch(header):
        return header
    return secrets.token_hex(16)


@contextmanager
def task_context(task_id: str | None, media_item_id: int | None = None) -> Iterator[None]:
    """Tag every line logged inside the block with the task's id and its row."""
    task_token = TASK_ID.set(task_id)
    item_token = MEDIA_ITEM_ID.set(media_item_id)
    try:
        yield
    finally:
        MEDIA_ITEM_ID.reset(item_token)
        TASK_ID.reset(task_token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, and the context
    fields that are set. A traceback goes inside the object (``exc_info``), never on lines
    of its own."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name, var in _CONTEXT:
            value = var.get()
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # ensure_ascii: control characters and line breaks are escaped, one record one line.
        return json.dumps(entry, ensure_ascii=True, default=str)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r} (text or json)")


# Marks the root handler this module installed, so configuring again replaces it and leaves
# handlers installed by others (a test's log capture, an embedding application) alone.
_OURS = "_ingest_log_handler"


def configure(level: str, log_format: str = "text") -> None:
    """Root logger: one stream handler of ours in the chosen format (replacing ours from
    before; any other handler stays)."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _OURS, False):
            root.removeHandler(existing)
    handler = logging.StreamHandler()
    setattr(handler, _OURS, True)
    handler.setFormatter(formatter(log_format))
    root.addHandler(handler)
    root.setLevel(level)
