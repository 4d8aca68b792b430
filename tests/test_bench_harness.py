"""The HTTP benchmarks' load generator: its measured window, and readings taken over it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.harness import Request, generate_load, with_overrides
from bench.webhook_bench import TINY

# A reading thread woken late on a loaded machine: answers this close to an edge of the
# window may fall on either side of it.
EDGE_SECONDS = 0.25


class _Answers(ThreadingHTTPServer):
    daemon_threads = True
    answered: list[float]


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the generator's connections expect
    # The headers and the body go out in two writes: without this each answer would wait
    # for the client's delayed ACK.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        assert isinstance(self.server, _Answers)
        self.server.answered.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Answers]:
    answers = _Answers(("127.0.0.1", 0), _Ok)
    answers.answered = []
    thread = threading.Thread(target=answers.serve_forever, daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        answers.shutdown()
        answers.server_close()


class RecordedWindow:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def begin(self) -> None:
        self.calls.append(("begin", time.monotonic()))

    def end(self) -> None:
        self.calls.append(("end", time.monotonic()))


class BrokenWindow:
    def begin(self) -> None:
        raise OSError("cannot read /proc")

    def end(self) -> None:
        pass


@pytest.mark.parametrize("load_processes", [0, 1, 2], ids=["inline", "spawned", "two spawned"])
def test_window_is_read_after_the_warm_up_and_as_the_load_stops(
    server: _Answers, load_processes: int
) -> None:
    window = RecordedWindow()
    plan = with_overrides(
        TINY, seconds=0.6, warmup_seconds=0.5, connections=2, load_processes=load_processes
    )

    result = generate_load(server.server_port, Request("GET", "/"), plan, window=window)

    assert [name for name, _ in window.calls] == ["begin", "end"]
    (_, began), (_, ended) = window.calls
    assert ended - began >= plan.seconds - 0.05
    # The warm-up's requests were answered before the window opened (had it opened as the
    # load began, none would be), and are not counted.
    assert [at for at in server.answered if at < began]
    assert result.acknowledged == len(server.answered)
    # Every process measured within the window: what was counted was answered inside it.
    around = [at for at in server.answered if began - EDGE_SECONDS <= at < ended + EDGE_SECONDS]
    assert 0 < len(result.latencies_ms) <= len(around)


def test_a_reading_that_fails_fails_the_load(server: _Answers) -> None:
    plan = with_overrides(TINY, seconds=0.2, warmup_seconds=0.1, connections=1, load_processes=0)
    with pytest.raises(OSError, match="cannot read"):
        generate_load(server.server_port, Request("GET", "/"), plan, window=BrokenWindow())


def test_without_a_window_the_load_runs_as_before(server: _Answers) -> None:
    plan = with_overrides(TINY, seconds=0.2, warmup_seconds=0.1, connections=1, load_processes=0)
    result = generate_load(server.server_port, Request("GET", "/"), plan)
    assert result.latencies_ms and result.statuses == {200: len(result.latencies_ms)}
