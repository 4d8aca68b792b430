"""The demo sends a request again when its kept-alive connection is reset before any answer
(a server closing an idle connection as the request is written), on a real socket."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from cli import demo_http
from cli.demo import post_webhook
from cli.demo_verify import _get_respecting_limit
from sandbox.provider import SandboxMedia
from sandbox.registration import DemoRegistration
from tests.plugins.servers import close_with_reset

ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)


@dataclass
class ResettingServer:
    """Answers 200 after resetting the first ``resets`` requests (RST, no answer)."""

    resets: int
    requests: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.requests.append(_read_request(conn))
            if len(self.requests) <= self.resets:
                close_with_reset(conn)  # as a server tearing the connection down does
                continue
            with conn:
                conn.sendall(ANSWER)

    def close(self) -> None:
        self._listener.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            wanted = int(line.split(b":", 1)[1])
            while len(body) < wanted:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def server_resetting(request: pytest.FixtureRequest) -> Iterator[ResettingServer]:
    server = ResettingServer(resets=request.param)
    yield server
    server.close()


@pytest.mark.parametrize("server_resetting", [1], indirect=True)
def test_a_read_whose_connection_was_reset_is_sent_again(server_resetting: ResettingServer) -> None:
    with httpx.Client(timeout=5.0) as http:
        response = _get_respecting_limit(http, f"{server_resetting.url}/read", lambda: None)
    assert response.status_code == 200
    assert len(server_resetting.requests) == 2


@pytest.mark.parametrize("server_resetting", [demo_http.ATTEMPTS], indirect=True)
def test_a_read_reset_every_time_raises_after_the_last_attempt(
    server_resetting: ResettingServer,
) -> None:
    with httpx.Client(timeout=5.0) as http, pytest.raises(demo_http.RESET_BEFORE_ANSWER):
        _get_respecting_limit(http, f"{server_resetting.url}/read", lambda: None)
    assert len(server_resetting.requests) == demo_http.ATTEMPTS


@pytest.mark.parametrize("server_resetting", [1], indirect=True)
def test_a_webhook_whose_connection_was_reset_is_posted_again_unchanged(
    server_resetting: ResettingServer,
) -> None:
    reg = DemoRegistration(
        instance="demo-x",
        phone_number_id="15550001",
        api_key="k",
        token="t",
        app_secret="s",
        webhook_secret=None,
    )
    media = SandboxMedia(
        media_id="1", phone_number_id="15550001", media_type="image", mime_type="image/jpeg",
        sha256="0" * 64, sha256_b64="", file_size=10, url="http://cdn.invalid/1",
    )  # fmt: skip
    with httpx.Client(timeout=5.0) as http:
        sent = post_webhook(http, server_resetting.url, reg, media, 0)
    assert sent.status == 200 and sent.problem is None
    first, second = server_resetting.requests
    assert first.partition(b"\r\n\r\n")[2] == second.partition(b"\r\n\r\n")[2]
