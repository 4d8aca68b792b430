"""What `ingest web` adds to gunicorn against hostile clients: escaped access lines, and a
time limit on reading each request.

**Access log** (:class:`EscapingLogger`): gunicorn writes request fields as received, and
``PATH_INFO`` is already percent-decoded, so ``/webhook/x%0d%0a2026-01-01 INFO FAKE`` began a
forged log line and ``%1b[31m`` wrote a terminal escape. Every text field of the access
line is escaped the way Apache's ``mod_log_config`` does it: ``\\n``, ``\\r``, ``\\t``
and the like in C notation, any other byte outside printable ASCII as ``\\xhh`` (gunicorn
hands request text over as one character per byte), a backslash doubled; gunicorn itself
then writes ``"`` as ``\\"``. A line is then one request, pure ASCII, and reads back
unambiguously.

**Read time limit** (:class:`DeadlineThreadWorker`): gunicorn 27's threaded worker waits
for a new connection's first byte without a thread (5 s, then on its poller for the
keep-alive time), but from the first byte on, a thread reads the request with blocking
reads and no limit: a client sending a header line, or a body byte, every few seconds held
that thread for as long as it liked, and a handful of such clients held every thread of a
process. gunicorn has no setting for it (``timeout`` is the worker's heartbeat, and bounds
only HTTP/2 streams; ``keepalive`` only idle connections). Each request therefore gets
:data:`READ_TIMEOUT_SECONDS` to deliver its headers, and again to deliver its body once the
headers are in. This is a deadline for the whole phase, not a timeout per read: a per-read
timeout never fires on a client that sends one byte just before it would. Past the
deadline the connection is closed (headers) or the read fails, which the application sees
as a client that went away (body: werkzeug's 400, and the connection is not reused). The
response is not limited: a large base64 body read slowly by a legitimate client is what the
threaded worker is for.

The limits of both: a buffering reverse proxy in front (docs/SECURITY.md, README) is still
the production answer, since it also absorbs slow readers and keeps the connections' cost
off the Python process.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker

# Headers, then the body, each within this many seconds (see the module docstring). A
# webhook body is at most INGEST_WEBHOOK_MAX_BYTES (4 MiB by default): 15 s asks for about
# 280 KB/s from the provider's servers, which any of them exceeds by far.
READ_TIMEOUT_SECONDS = 15.0

# Bytes outside printable ASCII, and the backslash that introduces an escape.
_UNSAFE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")
_C_ESCAPES = {
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
    "\v": "\\v",
}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    known = _C_ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(value: str) -> str:
    """``value`` as one printable ASCII line: nothing in it can start a line or steer a
    terminal."""
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(_escape_char, value)


class EscapingLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger whose access-line fields are escaped (see the module docstring)."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        # Every text atom: the request line and path, query, headers ({name}i), response
        # headers ({name}o), environment ({name}e), user, referer, agent. Numbers stay.
        return {
            key: escape(value) if isinstance(value, str) else value for key, value in atoms.items()
        }


class ReadDeadlineExceeded(TimeoutError):
    """A request did not arrive in time. An OSError, so that werkzeug reports the body read
    as a client that went away (400) instead of an application error (500)."""


class _DeadlineSocket:
    """A connection's socket as gunicorn's request parser reads it: every ``recv`` must end
    by the deadline of the request's current phase. Everything else (sends, close, fileno
    for the poller) goes to the socket untouched."""

    def __init__(self, sock: socket.socket, on_expiry: Callable[[str], None]) -> None:
        self._sock = sock
        self._on_expiry = on_expiry
        self._deadline: float | None = None
        self._phase = ""
        # Sticky: once a client missed a deadline, nothing more is read from it (not even
        # the lingering drain of a graceful close).
        self.expired = False

    def start(self, phase: str, seconds: float) -> None:
        self._phase = phase
        self._deadline = time.monotonic() + seconds

    def stop(self) -> None:
        self._deadline = None

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.expired:
            return b""
        if self._deadline is None:
            return self._sock.recv(size, flags)
        remaining = self._deadline - time.monotonic()
        if remaining > 0:
            prior = self._sock.gettimeout()
            self._sock.settimeout(remaining)
            try:
                return self._sock.recv(size, flags)
            except TimeoutError:
                pass
            finally:
                self._sock.settimeout(prior)
        self.expired = True
        self._on_expiry(self._phase)
        if self._phase == "headers":
            # End of stream: gunicorn's parser gives up quietly (no request, no traceback)
            # and closes the connection.
            return b""
        raise ReadDeadlineExceeded(f"request {self._phase} not received in time")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class DeadlineThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's threaded worker with a time limit on reading each request's headers and
    body (see the module docstring)."""

    read_timeout_seconds = READ_TIMEOUT_SECONDS

    def handle(self, conn: Any) -> Any:
        sock = conn.sock
        if not isinstance(sock, _DeadlineSocket):
            if self.cfg.is_ssl:
                # TLS wraps the real socket; `ingest web` never terminates TLS itself.
                return super().handle(conn)

            client = conn.client[0] if isinstance(conn.client, tuple) else conn.client or "-"

            def expired(phase: str) -> None:
                self.log.warning(
                    "slow client %s: request %s not received within %.0f s; connection closed",
                    client,
                    phase,
                    self.read_timeout_seconds,
                )

            sock = conn.sock = _DeadlineSocket(conn.sock, expired)
        # From the moment a thread takes the connection: a new one has sent its first byte,
        # a kept-alive one has become readable.
        sock.start("headers", self.read_timeout_seconds)
        try:
            return super().handle(conn)
        finally:
            sock.stop()

    def handle_request(self, req: Any, conn: Any) -> Any:
        # The headers are in: the body (read by the application) gets a deadline of its own.
        sock = conn.sock
        if isinstance(sock, _DeadlineSocket):
            sock.start("body", self.read_timeout_seconds)
        try:
            return super().handle_request(req, conn)
        finally:
            if isinstance(sock, _DeadlineSocket):
                # What follows (draining an unread body before keep-alive) has gunicorn's
                # own bound.
                sock.stop()
