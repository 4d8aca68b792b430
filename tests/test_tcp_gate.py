"""The fault suite's TCP gate: closing it resets connections, including those waiting."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.plugins.servers import TcpGate

# Far longer than a reset takes to arrive; a client still waiting then was never reset.
CLIENT_TIMEOUT_SECONDS = 5.0
REQUEST = b"PUT /bucket/key HTTP/1.1\r\nHost: s3\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def silent_server() -> Iterator[tuple[str, int]]:
    """Accepts, reads what it is sent and never answers: a request in flight stays so."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)
            connection.recv(65536)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[:2]
    finally:
        listener.close()
        for connection in held:
            connection.close()


def _ends(client: socket.socket, request: bytes, *, close_after: TcpGate | None = None) -> bool:
    """Send ``request`` and wait for the answer: does the connection end (a reset, or an
    orderly close) before the client's timeout? ``close_after``: a gate closed meanwhile."""
    try:
        client.sendall(request)
        if close_after is not None:
            threading.Timer(0.3, close_after.close_gate).start()
        return client.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_closing_the_gate_resets_a_connection_waiting_for_its_answer(
    silent_server: tuple[str, int],
) -> None:
    """Both of the gate's pumps are blocked reading when it closes (the request is sent,
    the answer is not): the client must see the connection end, not wait out its timeout,
    as an S3 client would wait out its 60 s read timeout."""
    gate = TcpGate(*silent_server)
    try:
        with socket.create_connection(("127.0.0.1", gate.port), CLIENT_TIMEOUT_SECONDS) as client:
            assert _ends(client, REQUEST, close_after=gate), "still open after the gate closed"
    finally:
        gate.stop()


def test_a_closed_gate_resets_new_connections(silent_server: tuple[str, int]) -> None:
    gate = TcpGate(*silent_server)
    try:
        gate.close_gate()
        with socket.create_connection(("127.0.0.1", gate.port), CLIENT_TIMEOUT_SECONDS) as client:
            assert _ends(client, REQUEST)
    finally:
        gate.stop()
