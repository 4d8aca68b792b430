"""`ingest web` against hostile clients: access lines that cannot be forged, and requests that
must arrive in bounded time (cli/web_hardening.py). The gunicorn tests start one real
`ingest web` (one process, its default threads) on a free port, shared by the module."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from gunicorn.config import Config
from gunicorn.http import get_parser
from gunicorn.http import wsgi as gunicorn_wsgi

from cli.service import ACCESS_LOG_FORMAT
from cli.web_hardening import EscapingLogger, escape
from sandbox.processes import ManagedProcess, ProcessGroup
from sandbox.stacks import embedded_stack_env

# --- the escaping itself ---------------------------------------------------------------------

# The web process below reads INGEST_WEB_READ_TIMEOUT_SECONDS: shorter than the 15 s default,
# so the slow-client tests wait seconds, not a quarter of a minute.
READ_TIMEOUT_SECONDS = 5.0


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("/webhook/shop", "/webhook/shop"),
        ("/x\r\n2026-01-01 INFO FAKE", "/x\\r\\n2026-01-01 INFO FAKE"),
        ("/x\x1b[31mred", "/x\\x1b[31mred"),
        ("a\tb\x00c\x7fd", "a\\tb\\x00c\\x7fd"),
        # One character per byte, as gunicorn decodes request text: UTF-8 shows as its bytes,
        # and C1 controls (NEL, \x85, ends a line for some readers) are escaped too.
        ("caf\xc3\xa9\xc2\x85", "caf\\xc3\\xa9\\xc2\\x85"),
        # A backslash is doubled, so a logged "\n" is always an escape, never sent text.
        ("a\\nb", "a\\\\nb"),
        ("\u2028", "\\u2028"),
    ],
)
def test_escape_leaves_one_printable_ascii_line(raw: str, logged: str) -> None:
    assert escape(raw) == logged
    assert escape(raw).isascii() and escape(raw).isprintable()


def _access_line(tmp_path: Path, raw_request: bytes, log_format: str) -> str:
    """The access line gunicorn's machinery writes for ``raw_request``, through our logger:
    gunicorn's own parser and WSGI environ, our logger class, a real log file."""
    cfg = Config()
    log_path = tmp_path / "access.log"
    cfg.set("accesslog", str(log_path))
    cfg.set("access_log_format", log_format)
    client = ("203.0.113.7", 40000)
    request = next(get_parser(cfg, iter([raw_request]), client))
    logger = EscapingLogger(cfg)
    server_side, client_side = socket.socketpair()
    try:
        response, environ = gunicorn_wsgi.create(
            request, server_side, client, ("127.0.0.1", 8000), cfg
        )
        response.status = "404 NOT FOUND"
        response.headers = [("Content-Type", "application/json"), ("X-Echo", "a\x1bb")]
        logger.access(response, request, environ, timedelta(milliseconds=3))
    finally:
        server_side.close()
        client_side.close()
        for handler in logger.access_log.handlers:
            handler.close()
    return log_path.read_text(encoding="ascii")


def test_every_access_field_is_escaped(tmp_path: Path) -> None:
    raw = (
        b"GET /webhook/x%0d%0a2026-01-01%20INFO%20FAKE%1b%5b31m?q=%0a1 HTTP/1.1\r\n"
        b"Host: example\r\n"
        # gunicorn refuses most control bytes in header values, but not the tab, nor the
        # 8-bit ones: \x9b is CSI, which terminals read as ESC [, and \x85 is NEL.
        b"User-Agent: agent\x9b2J\r\n"
        b"Referer: ref\x85erer\r\n"
        b"X-Forged: one\ttwo\r\n"
        b"Authorization: Basic dXNlcgpuYW1lOnB3\r\n"  # user "user\nname"
        b"\r\n"
    )
    every_field = (
        '%(h)s %(u)s "%(r)s" "%(m)s %(U)s %(H)s" q=%(q)s %(s)s '
        '"%(f)s" "%(a)s" x=%({x-forged}i)s echo=%({x-echo}o)s'
    )
    text = _access_line(tmp_path, raw, every_field)
    assert text.count("\n") == 1 and text.endswith("\n")
    line = text[:-1]
    assert line.isprintable()
    assert "\\r\\n2026-01-01 INFO FAKE\\x1b[31m" in line  # %(U)s, decoded then escaped
    assert "user\\nname" in line  # %(u)s
    assert "agent\\x9b2J" in line  # %(a)s
    assert "ref\\x85erer" in line  # %(f)s
    assert "x=one\\ttwo" in line  # a request header
    assert "echo=a\\x1bb" in line  # a response header
    assert "q=q=%0a1" in line  # the query string stays as sent (percent-encoded)


def test_the_web_command_s_access_line_is_escaped_too(tmp_path: Path) -> None:
    raw = (
        b"GET /webhook/x%0d%0a2026-01-01%20INFO%20FAKE?hub.verify_token=the-secret HTTP/1.1\r\n"
        b"Host: h\r\n\r\n"
    )
    text = _access_line(tmp_path, raw, ACCESS_LOG_FORMAT)
    # The query (the handshake's verify token) is not logged at all.
    assert text.splitlines() == [
        '203.0.113.7 "GET /webhook/x\\r\\n2026-01-01 INFO FAKE HTTP/1.1" 404 0 3ms'
    ]


# --- a real gunicorn -------------------------------------------------------------------------


@dataclass
class Web:
    process: ManagedProcess
    host: str
    port: int

    def log(self) -> str:
        return self.process.log()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("web-hardening")
    stack = embedded_stack_env(root)
    env = {**stack.env, "INGEST_WEB_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT_SECONDS)}
    group = ProcessGroup(log_dir=root / "logs", env=env)
    try:
        # One process, so the normal requests below meet the slow clients' process.
        process = group.web(workers=1)
        assert process.base_url is not None
        port = int(process.base_url.rsplit(":", 1)[1])
        yield Web(process, "127.0.0.1", port)
    finally:
        group.stop_all()
        stack.close()


def _exchange(web: Web, raw: bytes) -> bytes:
    with socket.create_connection((web.host, web.port), timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _wait_for_log(web: Web, marker: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = web.log()
        if marker in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{marker!r} never logged:\n{web.process.tail()}")


def test_a_forged_path_cannot_start_a_log_line_in_gunicorn(web: Web) -> None:
    body = b"{}"
    request = (
        b"POST /webhook/x%0d%0a2026-01-01%20INFO%20FAKE-LOG-LINE%1b%5b31m HTTP/1.1\r\n"
        b"Host: localhost\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    answer = _exchange(web, request)
    assert answer.startswith(b"HTTP/1.1 ")
    log = _wait_for_log(web, "FAKE-LOG-LINE")
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), web.log()
    assert "\x1b" not in log
    (access,) = [line for line in log.splitlines() if '"POST /webhook/x' in line]
    assert "/webhook/x\\r\\n2026-01-01 INFO FAKE-LOG-LINE\\x1b[31m HTTP/1.1" in access


@dataclass
class SlowClient:
    """Sends ``head`` at once, then one of ``pieces`` every ``interval`` seconds, and notes
    when the server ends the connection."""

    web: Web
    head: bytes
    pieces: list[bytes]
    interval: float = 2.0
    give_up_after: float = READ_TIMEOUT_SECONDS + 15
    closed_after: float | None = None
    answer: bytes = b""
    thread: threading.Thread = field(init=False)

    def start(self) -> SlowClient:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        with socket.create_connection((self.web.host, self.web.port), timeout=5) as sock:
            sock.sendall(self.head)
            pieces = iter(self.pieces)
            while time.monotonic() - started < self.give_up_after:
                readable, _, _ = select.select([sock], [], [], self.interval)
                try:
                    if readable:
                        data = sock.recv(65536)
                        self.answer += data
                        if not data:
                            break
                        continue
                    sock.sendall(next(pieces, b"x"))
                except OSError:  # reset by the server
                    break
            else:
                return
        self.closed_after = time.monotonic() - started


def test_slow_senders_are_cut_within_the_bound_while_others_are_served(web: Web) -> None:
    """One header line, or one body byte, every 2 s: each read is quick, so only a deadline
    for the whole headers (or body) ends them, within READ_TIMEOUT_SECONDS."""
    headers = SlowClient(
        web,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n",
        [b"X-Slow-%d: 1\r\n" % n for n in range(100)],
    ).start()
    body = SlowClient(
        web,
        b"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{",
        [b" "] * 100,
    ).start()

    # The same process keeps answering others while both slow clients hold a thread each.
    served = 0
    while headers.thread.is_alive() or body.thread.is_alive():
        assert httpx.get(f"http://{web.host}:{web.port}/healthz", timeout=5).status_code == 200
        served += 1
        time.sleep(1)
    assert served >= 3

    for client, phase in ((headers, "headers"), (body, "body")):
        assert client.closed_after is not None, f"{phase}: still open\n{web.process.tail()}"
        assert READ_TIMEOUT_SECONDS - 2 <= client.closed_after <= READ_TIMEOUT_SECONDS + 5, (
            phase,
            client.closed_after,
        )
        assert f"slow client 127.0.0.1: request {phase} not received within" in web.log()
    # Headers never completed: no request, no answer. The body's request gets the answer of
    # a client that went away, then the connection closes.
    assert headers.answer == b""
    assert body.answer.startswith(b"HTTP/1.1 400 "), body.answer[:200]


def test_the_web_command_runs_the_hardened_worker_and_logger_without_control_socket(
    web: Web,
) -> None:
    log = web.log()
    assert "Using worker: cli.web_hardening.DeadlineThreadWorker" in log
    # gunicorn's management socket is off: nothing uses it, and every `ingest web` of one
    # user would share its default path.
    assert "Control socket" not in log


def test_a_normal_request_with_a_body_is_unaffected(web: Web) -> None:
    response = httpx.post(
        f"http://{web.host}:{web.port}/webhook/nobody",
        content=b"{}",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    # Read in full and answered by the application (no such instance), not cut.
    assert response.status_code in (401, 404), response.text
    assert response.json()["success"] is False
