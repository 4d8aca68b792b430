"""``ingest demo``: real media through the whole pipeline, verified byte for byte.

A sandbox provider serves the media; the demo registers a throwaway instance and token in the
service's database (it runs on the same machine and reads the same ``INGEST_*`` variables),
checks that the service shares that database and downloads from that sandbox (one probe
webhook), posts signed webhooks, follows every row to a final state and reads each stored item
back through the base64 API while the others are still arriving. Afterwards it removes its
instance, token, rows and stored objects (``--keep`` keeps them). Exit status 1 when anything
was lost or corrupted, 2 when the demo could not run (one line saying what to set).

Which service: the one answering at ``--url``; when none answers, the demo starts the
embedded one itself (web, worker and beat subprocesses on a temporary ``var`` directory)
wired to a sandbox started in this process (or ``--sandbox``). Which sandbox for a running
service: ``--sandbox``; else the one ``INGEST_GRAPH_URL`` points at when it answers the
sandbox control API, else the one ``make run`` starts on ``SANDBOX_PORT`` (8090). None of
these answering is a one-line error: a sandbox of the demo's own would be useless to a
running service, which sends its provider key only to the host its ``INGEST_GRAPH_URL`` names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
from sqlalchemy import select
from sqlalchemy.engine import make_url

from ingest import accounts, migrate
from ingest.archive import NO_MEDIA
from ingest.db import make_engine, make_session_factory, session_scope
from ingest.models import TERMINAL_STATES, ApiToken, Instance, MediaItem, MediaState, Provider
from ingest.secrets import secret_box
from ingest.settings import Settings, hide_password, load_settings
from ingest.storage import storage_from_settings
from sandbox import payloads
from sandbox.payloads import sign

KB = 1024
MB = 1024 * KB
READY_TIMEOUT_SECONDS = 60.0
SEND_CONCURRENCY = 8
# The archive API reads run while the rows are still arriving; the service's web processes
# (make run: 2 x 4 threads) are the limit, not this.
VERIFY_CONCURRENCY = 8
POLL_SECONDS = 0.25
SECRET_HEADER = "X-Demo-Webhook-Secret"  # noqa: S105 - a header name, not a secret
# The demo reads every item back at once: its own token gets a limit of its own (what
# `ingest token create --rate-limit` sets), the deployment's INGEST_API_RATE_LIMIT stays.
DEMO_RATE_LIMIT = "100000/minute"
# How long the probe webhook's row may take to be stored before the demo gives up on the
# service downloading from its sandbox.
PROBE_TIMEOUT_SECONDS = 20.0
PROBE_SIZE = 20 * KB
# `make run` starts a sandbox on this port (see Procfile.dev and the Makefile).
MAKE_RUN_SANDBOX_PORT = "8090"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# A realistic inbound mix: mostly photos, some voice notes and stickers, fewer videos and
# documents (the large ones). Weight, then size range in bytes.
MEDIA_MIX: dict[str, tuple[int, tuple[int, int]]] = {
    "image": (40, (40 * KB, 400 * KB)),
    "audio": (20, (20 * KB, 600 * KB)),
    "sticker": (15, (10 * KB, 90 * KB)),
    "video": (10, (300 * KB, 3 * MB)),
    "document": (15, (30 * KB, 4 * MB)),
}


class DemoError(click.ClickException):
    """The demo could not run at all (as opposed to running and finding a loss): exit status
    2, one line saying what to set or where to run it."""

    exit_code = 2


# --- the embedded service ----------------------------------------------------------------


def _ingest_executable() -> str:
    beside = Path(sys.executable).parent / "ingest"
    found = str(beside) if beside.exists() else shutil.which("ingest")
    if not found:
        raise DemoError("cannot find the `ingest` executable to start the embedded service")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str, path: str = "/healthz") -> bool:
    try:
        return httpx.get(url.rstrip("/") + path, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            # Own process group: reaches gunicorn's workers and celery's pool too.
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


@contextmanager
def embedded_service(env: dict[str, str], var_dir: Path) -> Iterator[str]:
    """web + worker + beat on the embedded defaults under ``var_dir``; yields the base URL."""
    executable = _ingest_executable()
    port = _free_port()
    child_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INGEST_")},
        **env,
        "INGEST_VAR_DIR": str(var_dir),
    }
    child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    children: list[_Child] = []

    def start(name: str, *args: str) -> _Child:
        log_path = var_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(  # noqa: S603 - our own CLI
                [executable, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env,
                start_new_session=True,
            )
        child = _Child(name, popen, log_path)
        children.append(child)
        return child

    def wait(child: _Child, ready: Any, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if child.popen.poll() is not None:
                break
            if ready():
                return
            time.sleep(0.1)
        raise DemoError(f"embedded {child.name} not {what}; its log ends:\n{child.tail()}")

    base_url = f"http://127.0.0.1:{port}"
    try:
        web = start("web", "web", "--port", str(port), "--workers", "2")
        worker = start("worker", "worker", "--concurrency", "8")
        beat = start("beat", "beat")
        wait(web, lambda: answers(base_url), "answering")
        wait(worker, lambda: " ready." in worker.log_path.read_text(errors="replace"), "ready")
        wait(beat, lambda: "beat: Starting" in beat.log_path.read_text(errors="replace"), "up")
        yield base_url
    finally:
        for child in reversed(children):
            child.stop()


# --- the sandbox provider --------------------------------------------------------------


_GRAPH_VERSION_PATH = re.compile(r"/v\d+(\.\d+)?$")


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
    return answers(root, "/_sandbox/stats")


def find_sandbox(explicit: str | None, graph_url: str, environ: Mapping[str, str]) -> str | None:
    """The root URL of a running sandbox: ``explicit`` (which must answer), else the first
    default candidate that answers, else None."""
    if explicit:
        root = sandbox_root_of(explicit)
        if not sandbox_answers(root):
            raise DemoError(
                f"no sandbox answers at {root} (GET /_sandbox/stats): give --sandbox the root "
                "URL of a running one (`make run` starts one on port 8090, `ingest sandbox "
                "--port P` one on P)"
            )
        return root
    for candidate in default_sandbox_candidates(graph_url, environ):
        if sandbox_answers(candidate):
            return candidate
    return None


def no_sandbox_problem(service_url: str, graph_url: str, environ: Mapping[str, str]) -> str:
    """No sandbox answers where a running service's may be."""
    tried = ", ".join(default_sandbox_candidates(graph_url, environ))
    return (
        f"a service answers at {service_url}, but no sandbox answers where its may be "
        f"(tried {tried}: INGEST_GRAPH_URL's when local, then `make run`'s on SANDBOX_PORT, "
        "8090): give the demo "
        "--sandbox URL, the root of the sandbox the service downloads from (its "
        "INGEST_GRAPH_URL without /v21.0; for `make run` on other ports, SANDBOX_PORT=P), "
        "or run one (`ingest sandbox --port P`) and start the service with "
        + service_settings("http://127.0.0.1:P")
    )


def media_hosts_setting(sandbox_root: str) -> str:
    """INGEST_MEDIA_HOSTS for the sandbox at ``sandbox_root``: its host *and port*, since an
    entry without a port allows only 80 and 443 (sandbox.server.media_hosts_for's rule,
    on the text as written, so the hint's placeholder root "http://127.0.0.1:P" reads too)."""
    netloc = urlsplit(sandbox_root).netloc.rpartition("@")[2] or "127.0.0.1"
    if netloc == "localhost" or netloc.startswith("localhost:"):
        # Reached as 127.0.0.1 too, which the address check needs listed with its port.
        return f"{netloc},127.0.0.1{netloc.removeprefix('localhost')}"
    return netloc


def service_settings(sandbox_root: str) -> str:
    """The settings a service needs to download from the sandbox at ``sandbox_root``."""
    hosts = media_hosts_setting(sandbox_root)
    return (
        f"INGEST_GRAPH_URL={sandbox_root}/v21.0 INGEST_D360_URL={sandbox_root}/d360 "
        f"INGEST_MEDIA_HOSTS={hosts}"
    )


def service_fix(sandbox_root: str) -> str:
    """What to set for a service to download from the sandbox at ``sandbox_root``."""
    return (
        f"start the service with {service_settings(sandbox_root)}, or give the demo "
        "--sandbox URL, the root of the sandbox the service downloads from"
    )


@contextmanager
def in_process_sandbox() -> Iterator[str]:
    """Start the sandbox provider on a free port in a background thread; yield its root URL."""
    try:
        from sandbox.server import start_sandbox
    except ImportError as exc:
        raise DemoError(f"the sandbox provider is not available: {exc}") from None
    server = start_sandbox()
    try:
        yield str(server.base_url).rstrip("/")
    finally:
        server.stop()


@dataclass(frozen=True)
class SandboxMedia:
    media_type: str
    media_id: str
    sha256_hex: str
    sha256_b64: str
    mime_type: str
    file_size: int
    url: str  # signed, confidential: only ever placed in the webhook body

    def __repr__(self) -> str:
        return f"SandboxMedia({self.media_type}, {self.media_id}, {self.file_size} bytes)"


class SandboxControl:
    """The sandbox's HTTP control API (the same whether it runs here or elsewhere)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.http = httpx.Client(base_url=root, timeout=30.0)

    def add_number(
        self, phone_number_id: str, api_key: str, provider: Provider = Provider.CLOUD
    ) -> None:
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
            media_type=media_type,
            media_id=str(body["media_id"]),
            sha256_hex=body["sha256"],
            sha256_b64=body.get("sha256_b64")
            or base64.b64encode(bytes.fromhex(body["sha256"])).decode(),
            mime_type=body["mime_type"],
            file_size=int(body["file_size"]),
            url=body["url"],
        )

    def close(self) -> None:
        self.http.close()


# --- webhooks --------------------------------------------------------------------------


def media_message(media: SandboxMedia, wamid: str, sender: str, n: int) -> dict[str, Any]:
    """One inbound media message as the Cloud API sends it, varied the ways real ones vary
    (sha256 as hex or base64, captions with non-ASCII text, voice notes)."""
    kind = media.media_type
    return payloads.media_message(
        kind,
        media.media_id,
        mime_type=media.mime_type,
        sha256=media.sha256_b64 if n % 2 else media.sha256_hex,
        url=media.url,
        message_id=wamid,
        sender=sender,
        caption=f"demo {kind} {n} ✓" if kind in ("image", "video", "document") else None,
        filename=f"demo-{n}.pdf" if kind == "document" else None,
        voice=n % 3 == 0 if kind == "audio" else None,
        animated=False if kind == "sticker" else None,
    )


def webhook_body(phone_number_id: str, message: dict[str, Any]) -> bytes:
    """The signed bytes of one webhook carrying ``message`` (non-ASCII escaped, as Meta's)."""
    return payloads.encode(payloads.webhook(phone_number_id, messages=[message]))


# --- the service's database ---------------------------------------------------------------


def missing_database(settings: Settings) -> Path | None:
    """The SQLite file the settings name when it does not exist here (say, the command was
    started in another directory than `make run`); None for any other database. Judged
    before connecting, which would create an empty file."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    path = Path(url.database)
    return None if path.exists() else path.resolve()


def database_problem(settings: Settings, service_url: str) -> str | None:
    """Why the demo cannot share the database of the service answering at ``service_url``,
    known before touching it."""
    path = missing_database(settings)
    if path is None:
        return None
    return (
        f"a service answers at {service_url}, but its database is not here: {path} does not "
        "exist. The demo registers its instance in the service's database: run it from the "
        "directory of `make run`, or set the service's INGEST_VAR_DIR or INGEST_DATABASE_URL, "
        "or pass --url of a port where nothing runs to get an embedded service"
    )


def shared_database_problem(
    status: int, message: str | None, service_url: str, database_url: str
) -> str | None:
    """The service's answer to find-message with the demo's new token, for a message that
    does not exist: 404 "not found" if it reads the demo's database, 401 if it does not."""
    if status == 404 and message == NO_MEDIA:
        return None
    shown = hide_password(database_url)
    if status == 401:
        return (
            f"the service at {service_url} does not know the demo's token (401), so it does "
            f"not use the demo's database ({shown}): give the demo the service's "
            "INGEST_DATABASE_URL (or INGEST_VAR_DIR), or run it from the directory of `make run`"
        )
    return (
        f"the service at {service_url} answered {status} ({message or 'no message'}) to "
        "find-message with the demo's token, not 404: is it an ingest service, on its "
        "database?"
    )


def _error_message(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


def check_shared_database(
    http: httpx.Client, service_url: str, reg: DemoRegistration, settings: Settings
) -> None:
    try:
        response = http.get(
            f"{service_url}/api/chat/find-message/{reg.instance}",
            params={"messageId": "wamid.DEMO-NOT-SENT"},
            headers={"token": reg.token},
        )
    except httpx.HTTPError as exc:
        raise DemoError(f"the service at {service_url} stopped answering: {exc}") from None
    problem = shared_database_problem(
        response.status_code, _error_message(response), service_url, settings.database_url
    )
    if problem:
        raise DemoError(problem)


# --- the run ---------------------------------------------------------------------------


@dataclass
class Sent:
    media: SandboxMedia
    wamid: str
    sent_at: datetime
    status: int | None = None
    state: str = MediaState.PENDING
    reason: str | None = None
    stored_at: datetime | None = None
    verified: bool | None = None
    problem: str | None = None


@dataclass
class DemoRegistration:
    instance: str
    phone_number_id: str
    api_key: str
    token: str
    app_secret: str | None
    webhook_secret: str | None


def register(
    settings: Settings, provider: Provider, *, rate_limit: str | None = None
) -> DemoRegistration:
    """A throwaway instance (unique names) and an instance token, in the service's database.

    ``rate_limit``: the token's own archive API limit (default: the deployment's).
    """
    suffix = uuid.uuid4().hex[:10]
    api_key = secrets.token_urlsafe(24)
    app_secret = secrets.token_urlsafe(24) if provider is Provider.CLOUD else None
    # 360dialog cannot sign with Meta's secret: a shared-secret header stands in.
    webhook_secret = secrets.token_urlsafe(24) if provider is Provider.D360 else None
    spec = accounts.InstanceSpec(
        name=f"demo-{suffix}",
        provider=provider,
        phone_number_id=f"9{int(suffix, 16) % 10**14:014d}",
        api_key=api_key,
        app_secret=app_secret,
        webhook_secret_header=SECRET_HEADER if webhook_secret else None,
        webhook_secret=webhook_secret,
    )
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            try:
                accounts.get_account(session, accounts.DEFAULT_ACCOUNT)
            except accounts.RegistryError:
                accounts.add_account(session, accounts.DEFAULT_ACCOUNT)
            accounts.add_instance(session, spec, secret_box(settings))
            token = accounts.create_token(
                session, instance=spec.name, label="ingest demo", rate_limit=rate_limit
            )
    finally:
        engine.dispose()
    return DemoRegistration(
        spec.name, spec.phone_number_id, api_key, token, app_secret, webhook_secret
    )


@dataclass
class Cleanup:
    """What became of the demo's instance once it ended."""

    kept: bool = False
    removed: accounts.RemovedInstance | None = None
    error: str | None = None


def remove_registration(settings: Settings, reg: DemoRegistration) -> accounts.RemovedInstance:
    """Revoke the demo's token, then delete its instance with its rows and stored objects."""
    engine = make_engine(settings.database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            token_id = session.scalar(
                select(ApiToken.id).where(ApiToken.token_hash == accounts.hash_secret(reg.token))
            )
            if token_id is not None:
                accounts.revoke_token(session, token_id)
            return accounts.remove_instance(
                session, storage_from_settings(settings), reg.instance, purge=True
            )
    finally:
        engine.dispose()


def plan(events: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    kinds = list(MEDIA_MIX)
    weights = [MEDIA_MIX[k][0] for k in kinds]
    chosen = rng.choices(kinds, weights=weights, k=events)
    # Every type at least once when there is room for it.
    for i, kind in enumerate(kinds[: min(events, len(kinds))]):
        chosen[i] = kind
    return [(kind, rng.randint(*MEDIA_MIX[kind][1])) for kind in chosen]


def post_webhook(
    http: httpx.Client, service_url: str, reg: DemoRegistration, media: SandboxMedia, n: int
) -> Sent:
    """Post one signed webhook for ``media``; the :class:`Sent` says how the service took it."""
    wamid = f"wamid.DEMO{uuid.uuid4().hex.upper()}"
    body = webhook_body(reg.phone_number_id, media_message(media, wamid, "15551234567", n))
    headers = {"Content-Type": "application/json"}
    if reg.app_secret:
        headers["X-Hub-Signature-256"] = sign(reg.app_secret, body)
        path = "/webhook"
    else:
        assert reg.webhook_secret is not None
        headers[SECRET_HEADER] = reg.webhook_secret
        path = f"/webhook/{reg.instance}"
    sent = Sent(media=media, wamid=wamid, sent_at=datetime.now(UTC))
    try:
        response = http.post(service_url + path, content=body, headers=headers)
        sent.status = response.status_code
        if response.status_code != 200:
            sent.state, sent.reason = "rejected", f"webhook_{response.status_code}"
            sent.problem = _error_message(response)
    except httpx.HTTPError as exc:
        sent.state, sent.reason = "rejected", f"webhook_{type(exc).__name__}"
    return sent


def send_all(
    service_url: str,
    sandbox: SandboxControl,
    reg: DemoRegistration,
    provider: Provider,
    items: list[tuple[str, int]],
) -> list[Sent]:
    http = httpx.Client(timeout=30.0)

    def send(n: int, kind: str, size: int) -> Sent:
        return post_webhook(
            http, service_url, reg, sandbox.add_media(reg.phone_number_id, kind, size), n
        )

    try:
        with ThreadPoolExecutor(SEND_CONCURRENCY) as pool:
            futures = [pool.submit(send, n, kind, size) for n, (kind, size) in enumerate(items)]
            return [f.result() for f in futures]
    finally:
        http.close()


# --- the probe: one webhook before the many ---------------------------------------------


@dataclass(frozen=True)
class ProbeRow:
    """The probe's row (None: no row) and its instance, as the service left them."""

    state: str | None
    failure_reason: str | None = None
    last_error: str | None = None
    attempts: int = 0
    connected: bool = True
    disconnected_reason: str | None = None


def read_probe(settings: Settings, reg: DemoRegistration, wamid: str) -> ProbeRow:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            found = session.execute(
                select(
                    MediaItem.state,
                    MediaItem.failure_reason,
                    MediaItem.last_error,
                    MediaItem.attempts,
                    Instance.connected,
                    Instance.disconnected_reason,
                )
                .join(Instance, MediaItem.instance_id == Instance.id)
                .where(Instance.name == reg.instance, MediaItem.message_id == wamid)
            ).first()
    finally:
        engine.dispose()
    if found is None:
        return ProbeRow(state=None)
    return ProbeRow(*found)


def probe_problem(row: ProbeRow, service_url: str, sandbox_root: str, waited: float) -> str | None:
    """None when the probe's media was stored; else one line: what happened, what to set."""
    if row.state == MediaState.STORED:
        return None
    if row.state is None:
        return (
            f"the service at {service_url} accepted the probe webhook but its row is not in "
            "the demo's database: give the demo the service's INGEST_DATABASE_URL (or "
            "INGEST_VAR_DIR)"
        )
    reason = row.failure_reason
    if reason is None and not row.connected and row.disconnected_reason:
        reason = row.disconnected_reason.split(":", 1)[0]
    detail = "; ".join(part for part in (reason, row.last_error) if part)
    if row.state in TERMINAL_STATES:
        what = f"ended {row.state} ({detail or 'no reason recorded'})"
    elif row.attempts == 0 and not detail:
        return (
            f"the probe webhook was accepted by {service_url}, but no worker took its row in "
            f"{waited:.0f} s: start `ingest worker` (and `ingest beat`) with the service's "
            "settings, on its broker (INGEST_BROKER_URL)"
        )
    else:
        what = f"is still {row.state} after {waited:.0f} s ({detail or 'no reason recorded'})"
    return (
        f"the probe webhook's media {what}: the service at {service_url} does not download "
        f"from the demo's sandbox at {sandbox_root}; {service_fix(sandbox_root)}"
    )


def run_probe(
    http: httpx.Client,
    service_url: str,
    sandbox: SandboxControl,
    reg: DemoRegistration,
    settings: Settings,
    timeout: float = PROBE_TIMEOUT_SECONDS,
) -> float:
    """One webhook, followed until its row is stored: seconds it took. DemoError otherwise."""
    started = time.monotonic()
    sent = post_webhook(
        http, service_url, reg, sandbox.add_media(reg.phone_number_id, "image", PROBE_SIZE), 0
    )
    if sent.status != 200:
        answer = f"{sent.status} ({sent.problem})" if sent.status else sent.reason
        raise DemoError(
            f"the service at {service_url} refused the probe webhook: {answer}; give the "
            "demo the service's INGEST_DATABASE_URL (or INGEST_VAR_DIR)"
        )
    deadline = started + timeout
    while True:
        row = read_probe(settings, reg, sent.wamid)
        if row.state in TERMINAL_STATES or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    waited = time.monotonic() - started
    problem = probe_problem(row, service_url, sandbox_root=sandbox.root, waited=waited)
    if problem:
        raise DemoError(problem)
    return waited


# --- following and verifying ------------------------------------------------------------


class _NoBar:
    """Stands in for a progress bar where tqdm is not installed (it comes with `make run`'s
    extra, not with the service: a container image runs the demo without it)."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, count: int) -> None:
        self.n += count

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, quiet: bool, position: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        unit="item",
        # A bar is for a person at a terminal; in a pipe or a log it is only noise.
        disable=quiet or not sys.stderr.isatty(),
        file=sys.stderr,
        mininterval=0.5,
        position=position,
    )


def verify_item(
    http: httpx.Client,
    service_url: str,
    instance: str,
    item: Sent,
    throttled: Callable[[], None] = lambda: None,
) -> None:
    """Read one stored item back (find-message, then base64) and compare it byte for byte.
    ``throttled`` is called for every 429 the archive API answers."""
    params = {"messageId": item.wamid}
    found = _get_respecting_limit(
        http, f"{service_url}/api/chat/find-message/{instance}", throttled, params=params
    )
    if found.status_code != 200:
        item.verified, item.problem = False, f"find-message answered {found.status_code}"
        return
    response = _get_respecting_limit(
        http, f"{service_url}/api/chat/base64/{instance}", throttled, params=params
    )
    if response.status_code != 200:
        item.verified, item.problem = False, f"base64 answered {response.status_code}"
        return
    body = response.json()
    try:
        data = base64.b64decode(body["base64"], validate=True)
    except (KeyError, binascii.Error):
        item.verified, item.problem = False, "base64 body unreadable"
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest != item.media.sha256_hex or len(data) != item.media.file_size:
        item.verified, item.problem = False, "bytes differ from the provider's"
    elif found.json().get("sha256") != item.media.sha256_hex:
        item.verified, item.problem = False, "find-message states another sha256"
    elif body.get("media_type") != item.media.media_type:
        item.verified, item.problem = False, f"media_type {body.get('media_type')!r}"
    else:
        item.verified = True


def _get_respecting_limit(
    http: httpx.Client, url: str, throttled: Callable[[], None], **kwargs: Any
) -> httpx.Response:
    """Should the service still limit the demo's token, wait when it says so."""
    for _ in range(10):
        response = http.get(url, **kwargs)
        if response.status_code != 429:
            return response
        throttled()
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 60.0))
    return response


class Verifier:
    """Verifies items as they are handed over (rows just stored), several at a time."""

    def __init__(
        self, service_url: str, reg: DemoRegistration, concurrency: int = VERIFY_CONCURRENCY
    ) -> None:
        self._service_url = service_url
        self._instance = reg.instance
        self._http = httpx.Client(
            timeout=60.0,
            headers={"token": reg.token},
            limits=httpx.Limits(max_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="demo-verify")
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self.throttled = 0  # 429 answers: the token's limit was in the way

    def _count_throttled(self) -> None:
        with self._lock:
            self.throttled += 1

    def submit(self, item: Sent) -> None:
        self._futures.append(
            self._pool.submit(
                verify_item,
                self._http,
                self._service_url,
                self._instance,
                item,
                self._count_throttled,
            )
        )

    def done(self) -> int:
        return sum(1 for future in self._futures if future.done())

    def wait(self, progress: Callable[[int], None] = lambda _: None) -> None:
        """Until every item handed over is verified; ``progress(done)`` now and then."""
        while self.done() < len(self._futures):
            progress(self.done())
            time.sleep(POLL_SECONDS)
        progress(self.done())
        for future in self._futures:
            future.result()  # a bug in verify_item is raised here, not swallowed

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()


def follow(
    settings: Settings,
    reg: DemoRegistration,
    sent: list[Sent],
    timeout: float,
    quiet: bool,
    verifier: Verifier | None = None,
) -> None:
    """Poll the rows (one query per round) until every accepted item is final, or timeout;
    each item stored is handed to ``verifier`` at once, and both bars move together."""
    by_wamid = {s.wamid: s for s in sent if s.state != "rejected"}
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    deadline = time.monotonic() + timeout
    stored_bar = _bar(len(by_wamid), "stored", quiet, 0)
    verified_bar = _bar(len(by_wamid), "verified", quiet, 1) if verifier else None
    handed: set[str] = set()

    def show_verified(done: int) -> None:
        if verified_bar is not None:
            verified_bar.update(done - verified_bar.n)

    try:
        done = 0
        while done < len(by_wamid) and time.monotonic() < deadline:
            with sessions() as session:
                rows = session.execute(
                    select(
                        MediaItem.message_id,
                        MediaItem.state,
                        MediaItem.failure_reason,
                        MediaItem.stored_at,
                    )
                    .join(Instance, MediaItem.instance_id == Instance.id)
                    .where(Instance.name == reg.instance)
                ).all()
            for message_id, state, reason, stored_at in rows:
                item = by_wamid.get(message_id)
                if item is not None:
                    item.state, item.reason, item.stored_at = state, reason, stored_at
                    if verifier and state == MediaState.STORED and message_id not in handed:
                        handed.add(message_id)
                        verifier.submit(item)
            now_done = sum(1 for s in by_wamid.values() if s.state in TERMINAL_STATES)
            stored_bar.update(now_done - done)
            done = now_done
            if verifier:
                show_verified(verifier.done())
            if done < len(by_wamid):
                time.sleep(POLL_SECONDS)
        if verifier:
            verifier.wait(show_verified)
    finally:
        stored_bar.close()
        if verified_bar is not None:
            verified_bar.close()
        engine.dispose()
    for item in by_wamid.values():
        if item.state not in TERMINAL_STATES:
            item.reason = item.reason or f"still_{item.state}"


# --- the summary ------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile (inclusive method), or None for no values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarise(
    sent: list[Sent], provider: Provider, service_url: str, embedded: bool
) -> dict[str, Any]:
    stored = [s for s in sent if s.state == MediaState.STORED and s.stored_at is not None]
    latencies = sorted(
        (s.stored_at - s.sent_at).total_seconds() for s in stored if s.stored_at is not None
    )
    failed = Counter(s.reason or s.state for s in sent if s.state != MediaState.STORED)
    corrupted = [s for s in stored if s.verified is False]
    span = (
        (
            max(s.stored_at for s in stored if s.stored_at) - min(s.sent_at for s in sent)
        ).total_seconds()
        if stored
        else 0.0
    )
    by_type = Counter(s.media.media_type for s in sent)
    return {
        "provider": str(provider),
        "service": service_url,
        "embedded_service": embedded,
        "sent": len(sent),
        "accepted": sum(1 for s in sent if s.status == 200),
        "stored": len(stored),
        "verified": sum(1 for s in stored if s.verified),
        "corrupted": len(corrupted),
        "lost": len(sent) - len(stored),
        "failed_by_reason": dict(sorted(failed.items())),
        "problems": sorted({s.problem for s in corrupted if s.problem}),
        "by_type": dict(sorted(by_type.items())),
        "bytes": sum(s.media.file_size for s in sent),
        "throughput_items_per_second": round(len(stored) / span, 2) if span > 0 else None,
        "seconds_to_stored": {
            name: None if value is None else round(value, 3)
            for name, value in (
                ("p50", percentile(latencies, 50)),
                ("p95", percentile(latencies, 95)),
                ("p99", percentile(latencies, 99)),
                ("max", latencies[-1] if latencies else None),
            )
        },
    }


def cleanup_summary(cleanup: Cleanup, instance: str, var_dir: Path | None) -> dict[str, Any]:
    """The summary's account of the demo's own rows: removed, kept (and how to look), failed."""
    result: dict[str, Any] = {"instance": instance, "kept": cleanup.kept}
    if cleanup.removed is not None:
        result["removed"] = {
            "media_rows": cleanup.removed.media_rows,
            "objects": cleanup.removed.objects,
            "tokens": cleanup.removed.tokens,
        }
    if cleanup.error is not None:
        result["error"] = cleanup.error
    if cleanup.kept:
        env = f"INGEST_VAR_DIR={var_dir} " if var_dir is not None else ""
        result["look"] = (
            f"{env}ingest media list --instance {instance}; "
            f"{env}ingest token list --instance {instance}"
        )
    return result


def cleanup_line(cleanup: dict[str, Any]) -> str:
    if cleanup["kept"]:
        return f"kept        instance {cleanup['instance']}, its token and media: {cleanup['look']}"
    if "removed" in cleanup:
        removed = cleanup["removed"]
        return (
            f"cleanup     instance {cleanup['instance']} and its token removed, with "
            f"{removed['media_rows']} media rows and {removed['objects']} stored objects, the "
            "probe's included (--keep keeps them)"
        )
    return f"cleanup     FAILED for instance {cleanup['instance']}: {cleanup.get('error')}"


def print_summary(summary: dict[str, Any]) -> None:
    lat = summary["seconds_to_stored"]
    where = "embedded service (started by the demo)" if summary["embedded_service"] else ""
    click.echo(f"service     {summary['service']} {where}".rstrip())
    if summary.get("sandbox"):
        click.echo(f"sandbox     {summary['sandbox']}")
    click.echo(f"provider    {summary['provider']}")
    if summary.get("token_rate_limit"):
        click.echo(
            f"token       own rate limit {summary['token_rate_limit']} (as `ingest token create "
            "--rate-limit` sets); INGEST_API_RATE_LIMIT unchanged for every other token"
        )
    click.echo(
        f"sent        {summary['sent']} ({summary['bytes'] / MB:.1f} MB: "
        + ", ".join(f"{k} {v}" for k, v in summary["by_type"].items())
        + ")"
    )
    click.echo(f"accepted    {summary['accepted']}")
    click.echo(f"stored      {summary['stored']} (verified byte for byte: {summary['verified']})")
    failed = summary["failed_by_reason"]
    click.echo(
        "failed      " + (", ".join(f"{k}: {v}" for k, v in failed.items()) if failed else "0")
    )
    click.echo(f"corrupted   {summary['corrupted']}")
    rate = summary["throughput_items_per_second"]
    click.echo(f"throughput  {rate if rate is not None else '-'} items/s")
    click.echo(
        "to stored   "
        + "  ".join(f"{k} {'-' if v is None else f'{v:.2f} s'}" for k, v in lat.items())
    )
    if summary.get("seconds_to_verified") is not None:
        click.echo(
            f"to verified {summary['seconds_to_verified']:.1f} s for all, from the first webhook"
            + (
                f" ({summary['api_throttled']} archive API answers were 429: the token's limit)"
                if summary.get("api_throttled")
                else ""
            )
        )
    if summary.get("cleanup"):
        click.echo(cleanup_line(summary["cleanup"]))
    verdict = "OK: nothing lost or corrupted" if demo_ok(summary) else "FAILED: see above"
    click.echo(verdict)


def demo_ok(summary: dict[str, Any]) -> bool:
    return bool(
        summary["sent"] > 0
        and summary["lost"] == 0
        and summary["corrupted"] == 0
        and summary["verified"] == summary["sent"]
    )


# --- the command ------------------------------------------------------------------------


@click.command()
@click.option("--events", default=40, show_default=True, type=click.IntRange(1, 100_000))
@click.option(
    "--provider",
    type=click.Choice([p.value for p in Provider]),
    default=Provider.CLOUD.value,
    show_default=True,
)
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The running service; when none answers there, the demo starts an embedded one.",
)
@click.option(
    "--sandbox",
    "sandbox_url",
    metavar="URL",
    help="Root URL of the sandbox the service downloads from (its INGEST_GRAPH_URL without "
    "/v21.0). Default: INGEST_GRAPH_URL's when local, else make run's (SANDBOX_PORT, 8090); "
    "an embedded service gets one started by the demo.",
)
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for rows.")
@click.option("--seed", default=1, show_default=True, help="Seed of the media mix.")
@click.option(
    "--keep", is_flag=True, help="Keep the demo's instance, token, rows and stored objects."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo(
    events: int,
    provider: str,
    url: str,
    sandbox_url: str | None,
    timeout: float,
    seed: int,
    keep: bool,
    as_json: bool,
) -> None:
    """Send N signed webhooks with real media from a sandbox provider and verify every item.

    \b
    Service: the one answering at --url. The demo registers a throwaway instance
    and token in that service's database, so it needs the service's settings:
    run it from the directory of `make run` (its ./var), or export the service's
    INGEST_VAR_DIR or INGEST_DATABASE_URL (and INGEST_STORAGE_URL). When nothing
    answers at --url, it starts an embedded service in a temporary directory.

    \b
    Sandbox: --sandbox, the root URL of the sandbox provider the service
    downloads from (the service's INGEST_GRAPH_URL without /v21.0). Before the N
    webhooks, the demo checks that the service reads its database and stores one
    probe item from that sandbox (within 20 s); if not, it says in one line what
    to set.

    Its token has its own rate limit (100000/minute); the deployment's stays.
    The instance, token, rows and stored objects are removed at the end unless
    --keep. Summary: sent, stored, failed by reason, throughput, p50/p95/p99 time
    from webhook to stored. Exit status 1 when anything was lost or corrupted, 2
    when the demo could not run.
    """
    chosen = Provider(provider)
    url = url.rstrip("/")
    cleanup = Cleanup(kept=keep)
    var_dir: Path | None = None

    def note(message: str) -> None:
        if not as_json:
            click.echo(message, err=True)

    with ExitStack() as stack:
        if answers(url):
            embedded = False
            settings = load_settings()
            problem = database_problem(settings, url)
            if problem:
                raise DemoError(problem)
            sandbox_root = find_sandbox(sandbox_url, settings.graph_url, os.environ)
            if sandbox_root is None:
                # A sandbox of the demo's own would be of no use: the service sends its
                # provider key only to the host its INGEST_GRAPH_URL names, and the sandbox
                # refuses downloads without it.
                raise DemoError(no_sandbox_problem(url, settings.graph_url, os.environ))
        else:
            embedded = True
            sandbox_root = find_sandbox(sandbox_url, "", {}) if sandbox_url else None
            if sandbox_root is None:
                sandbox_root = stack.enter_context(in_process_sandbox())
            var_dir = Path(tempfile.mkdtemp(prefix="ingest-demo-"))
            if not keep:
                stack.callback(shutil.rmtree, var_dir, ignore_errors=True)
            env = {
                "INGEST_GRAPH_URL": f"{sandbox_root}/v21.0",
                "INGEST_D360_URL": f"{sandbox_root}/d360",
                "INGEST_MEDIA_HOSTS": media_hosts_setting(sandbox_root),
                "INGEST_RECONCILE_INTERVAL_SECONDS": "5",
            }
            # Explicit values: the demo's own INGEST_* variables name a service that is not
            # running, and must not steer it away from the embedded one it starts.
            settings = load_settings(
                var_dir=var_dir,
                database_url="",
                broker_url="",
                storage_url="",
                graph_url=env["INGEST_GRAPH_URL"],
                d360_url=env["INGEST_D360_URL"],
            )
            settings.ensure_var_dir()
            migrate.upgrade(settings.database_url)
            note(f"no service at {url}: starting the embedded one in {var_dir}")
            url = stack.enter_context(embedded_service(env, var_dir))

        control = SandboxControl(sandbox_root)
        stack.callback(control.close)
        http = httpx.Client(timeout=30.0)
        stack.callback(http.close)
        reg = register(settings, chosen, rate_limit=DEMO_RATE_LIMIT)
        if not keep:
            stack.callback(_clean_up, cleanup, settings, reg, note)
        control.add_number(reg.phone_number_id, reg.api_key, chosen)
        check_shared_database(http, url, reg, settings)
        probe_seconds = run_probe(http, url, control, reg, settings)
        note(
            f"instance {reg.instance} ({chosen}): the service stored a probe item from the "
            f"sandbox at {sandbox_root} in {probe_seconds:.1f} s; sending {events} webhooks"
        )
        started = time.monotonic()
        sent = send_all(url, control, reg, chosen, plan(events, seed))
        verifier = Verifier(url, reg)
        stack.callback(verifier.close)
        follow(settings, reg, sent, timeout, as_json, verifier)
        summary = summarise(sent, chosen, url, embedded)
        summary["seconds_to_verified"] = round(time.monotonic() - started, 1)
        summary["api_throttled"] = verifier.throttled

    summary["sandbox"] = sandbox_root
    summary["token_rate_limit"] = DEMO_RATE_LIMIT
    summary["cleanup"] = cleanup_summary(cleanup, reg.instance, var_dir if embedded else None)
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        print_summary(summary)
    if not demo_ok(summary):
        sys.exit(1)


def _clean_up(
    cleanup: Cleanup, settings: Settings, reg: DemoRegistration, note: Callable[[str], None]
) -> None:
    try:
        cleanup.removed = remove_registration(settings, reg)
    except Exception as exc:  # noqa: BLE001 - reported; the run's own verdict stands
        cleanup.error = f"{type(exc).__name__}: {exc}"
        note(f"could not remove the demo's instance {reg.instance}: {cleanup.error}")


COMMANDS = (demo,)
