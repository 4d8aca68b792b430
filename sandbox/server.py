"""Run the sandbox provider in a background thread on a free port, and control it from Python.

    server = start_sandbox()
    server.add_number("15550001", "key")
    media = server.add_media("15550001", "image", size=200_000)
    settings = make_settings(graph_url=server.graph_url, d360_url=server.d360_url)
    ...
    server.stop()

The methods mirror the HTTP control API (``/_sandbox/...``), which other processes use.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from sandbox.app import create_sandbox_app
from sandbox.provider import (
    Faults,
    Number,
    SandboxConfig,
    SandboxMedia,
    SandboxProvider,
    SeenRequest,
    ServedError,
)


def media_hosts_for(base_url: str) -> list[str]:
    """``INGEST_MEDIA_HOSTS`` entries for a service that downloads from the sandbox at
    ``base_url``: its host *and port* (an entry without a port allows only 80/443). A
    sandbox named ``localhost`` is also reached as 127.0.0.1, which the address check needs."""
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    hosts = [f"{shown}:{port}"]
    if host == "localhost":
        hosts.append(f"127.0.0.1:{port}")
    return hosts


class QuietHandler(WSGIRequestHandler):
    """No access log: tests and the demo print their own summaries."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class PathOnlyHandler(WSGIRequestHandler):
    """Access log without query strings: the CDN's signed URLs are confidential there too."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = self.path.split("?", 1)[0]
        self.log("info", '"%s %s" %s %s', self.command, path, code, size)


class SandboxServer:
    def __init__(self, provider: SandboxProvider, server: BaseWSGIServer) -> None:
        self.provider = provider
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="sandbox-provider", daemon=True
        )
        host = server.host if server.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        self.base_url = f"http://{host}:{server.port}"
        self.graph_url = f"{self.base_url}/{provider.config.graph_version}"
        self.d360_url = f"{self.base_url}/d360"
        self.media_hosts = media_hosts_for(self.base_url)

    def start(self) -> SandboxServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> SandboxServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- control (mirrors /_sandbox/...) ----------------------------------------------

    def add_number(self, phone_number_id: str, api_key: str, provider: str = "cloud") -> Number:
        return self.provider.add_number(phone_number_id, api_key, provider)

    def add_media(
        self,
        phone_number_id: str,
        media_type: str,
        *,
        size: int | None = None,
        mime_type: str | None = None,
    ) -> SandboxMedia:
        return self.provider.add_media(
            phone_number_id, media_type, base_url=self.base_url, size=size, mime_type=mime_type
        )

    def signed_url(self, media_id: str) -> str:
        """A fresh Cloud CDN URL for ``media_id`` (what a new lookup would answer)."""
        return self.base_url + self.provider.signed_path(media_id)

    def media_bytes(self, media_id: str) -> bytes:
        found = self.provider.item(media_id)
        if found is None:
            raise KeyError(media_id)
        return found[1].read()

    def set_faults(self, media_id: str | None = None, **faults: Any) -> Faults:
        return self.provider.set_faults(media_id, **faults)

    def reset(self) -> None:
        self.provider.reset()

    def advance_clock(self, seconds: float) -> None:
        self.provider.advance_clock(seconds)

    def stats(self) -> dict[str, Any]:
        return self.provider.stats()

    def requests(self, endpoint: str, media_id: str | None = None) -> int:
        return self.provider.requests(endpoint, media_id)

    def seen(self) -> list[SeenRequest]:
        return self.provider.seen()

    def errors_served(self, phone_number_id: str | None = None) -> list[ServedError]:
        return self.provider.errors_served(phone_number_id)

    def max_errors_in_window(self, phone_number_id: str) -> int:
        return self.provider.max_errors_in_window(phone_number_id)


def start_sandbox(
    config: SandboxConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    quiet: bool = True,
) -> SandboxServer:
    """Serve a fresh sandbox (threaded) on ``host:port`` (0: a free port) in the background."""
    provider = SandboxProvider(config)
    return SandboxServer(provider, make_sandbox_server(provider, host, port, quiet=quiet)).start()


def make_sandbox_server(
    provider: SandboxProvider, host: str, port: int, *, quiet: bool
) -> BaseWSGIServer:
    """A threaded server for ``provider``; its access log, if any, leaves out query strings."""
    return make_server(
        host,
        port,
        create_sandbox_app(provider=provider),
        threaded=True,
        request_handler=QuietHandler if quiet else PathOnlyHandler,
    )
