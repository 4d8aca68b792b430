"""The sandbox provider for tests: one server per session, fresh state per test.

Fixtures: ``sandbox`` (a :class:`sandbox.server.SandboxServer`, reset before each test; its
clock offset, numbers, media, faults and counters start empty) and ``sandbox_settings``
(``make_settings`` pointed at it: graph and 360dialog URLs, its address and port allowed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sandbox.server import SandboxServer, start_sandbox


@pytest.fixture(scope="session")
def _sandbox_server() -> Iterator[SandboxServer]:
    server = start_sandbox()
    yield server
    server.stop()


@pytest.fixture
def sandbox(_sandbox_server: SandboxServer) -> SandboxServer:
    _sandbox_server.reset()
    return _sandbox_server


@pytest.fixture
def sandbox_settings(sandbox: SandboxServer, make_settings: Any) -> Any:
    return make_settings(
        graph_url=sandbox.graph_url,
        d360_url=sandbox.d360_url,
        media_hosts=sandbox.media_hosts,
        http_timeout_seconds=5.0,
    )
