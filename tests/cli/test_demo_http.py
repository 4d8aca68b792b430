"""The demo sends a request again when its kept-alive connection is reset before any answer
(a server closing an idle connection as the request is written), on a real socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cli import demo_http
from cli.demo import post_webhook
from cli.demo_verify import _get_respecting_limit
from sandbox.provider import SandboxMedia
from sandbox.registration import DemoRegistration
from tests.plugins.servers import close_with_reset


class ResettingServer:
    """Answers 200 after resetting the first ``resets`` requests (RST, no answer); keeps each
    request as received (request line and headers, a blank line, the body)."""

    def __init__(self, resets: int) -> None:
        self.resets = resets
        self.requests: list[bytes] = []
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                head = f"{self.requestline}\r\n{self.headers}".rstrip("\r\n").encode()
                server.requests.append(head + b"\r\n\r\n" + body)
                if len(server.requests) <= server.resets:
                    close_with_reset(self.connection)  # as a server tearing it down does
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_GET

            def log_message(self, *_: object) -> None:
                pass

        return Handler

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


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
