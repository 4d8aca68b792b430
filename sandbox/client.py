"""The sandbox provider from another process: find a running one, and drive it over its HTTP
control API (``/_sandbox/...``), as ``ingest demo``, ``ingest sandbox send``, end-to-end tests
and benchmarks do. In the sandbox's own process, :class:`sandbox.server.SandboxServer` offers
the same calls without HTTP.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

from sandbox.processes import answers
from sandbox.provider import SandboxMedia

# `make run` starts a sandbox on this port (see Procfile.dev and the Makefile).
MAKE_RUN_SANDBOX_PORT = "8090"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_GRAPH_VERSION_PATH = re.compile(r"/v\d+(\.\d+)?$")


class SandboxNotFound(RuntimeError):
    """No sandbox answers at the URL given."""


class SandboxControl:
    """The sandbox's HTTP control API (the same whether it runs here or elsewhere)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.http = httpx.Client(base_url=root, timeout=30.0)

    def add_number(self, phone_number_id: str, api_key: str, provider: str = "cloud") -> None:
        self.http.post(
            "/_sandbox/numbers",
            json={
                "phone_number_id": phone_number_id,
                "api_key": api_key,
                "provider": str(provider),
            },
        ).raise_for_status()

    def add_media(
        self, phone_number_id: str, media_type: str, size: int | None = None
    ) -> SandboxMedia:
        response = self.http.post(
            "/_sandbox/media",
            json={"phone_number_id": phone_number_id, "media_type": media_type, "size": size},
        )
        response.raise_for_status()
        body = response.json()
        return SandboxMedia(
            media_id=str(body["media_id"]),
            phone_number_id=str(body.get("phone_number_id", phone_number_id)),
            media_type=media_type,
            mime_type=body["mime_type"],
            sha256=body["sha256"],
            sha256_b64=body.get("sha256_b64")
            or base64.b64encode(bytes.fromhex(body["sha256"])).decode(),
            file_size=int(body["file_size"]),
            url=body["url"],
        )

    def close(self) -> None:
        self.http.close()


def sandbox_root_of(url: str) -> str:
    """The sandbox root from what a user may give: the root itself, or the Graph URL
    (``.../v21.0``) or 360dialog URL (``.../d360``) a service is configured with."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    path = _GRAPH_VERSION_PATH.sub("", path).removesuffix("/d360")
    return f"{parts.scheme}://{parts.netloc}{path}"


def default_sandbox_candidates(graph_url: str, environ: Mapping[str, str]) -> list[str]:
    """Where a sandbox may already run, in order: the one ``INGEST_GRAPH_URL`` names when it
    is on this machine, then the one ``make run`` starts (``SANDBOX_PORT``, 8090)."""
    candidates = []
    if urlsplit(graph_url).hostname in LOOPBACK_HOSTS:
        candidates.append(sandbox_root_of(graph_url))
    port = environ.get("SANDBOX_PORT") or MAKE_RUN_SANDBOX_PORT
    candidates.append(f"http://127.0.0.1:{port}")
    return list(dict.fromkeys(candidates))


def sandbox_answers(root: str) -> bool:
    return answers(root.rstrip("/") + "/_sandbox/stats")


def find_sandbox(explicit: str | None, graph_url: str, environ: Mapping[str, str]) -> str | None:
    """The root URL of a running sandbox: ``explicit`` (which must answer, else
    :class:`SandboxNotFound`), else the first default candidate that answers, else None."""
    if explicit:
        root = sandbox_root_of(explicit)
        if not sandbox_answers(root):
            raise SandboxNotFound(
                f"no sandbox answers at {root} (GET /_sandbox/stats): give --sandbox the root "
                "URL of a running one (`make run` starts one on port 8090, `ingest sandbox "
                "--port P` one on P)"
            )
        return root
    for candidate in default_sandbox_candidates(graph_url, environ):
        if sandbox_answers(candidate):
            return candidate
    return None
