"""``ingest demo``: real media through the whole pipeline, verified byte for byte.

A sandbox provider serves the media; the demo registers a throwaway instance and token in the
service's database (it runs on the same machine and reads the same ``INGEST_*`` variables),
posts signed webhooks, follows every row to a final state and reads each stored item back
through the base64 API. Exit status 1 when anything was lost or corrupted.

Which service: the one answering at ``--url``; when none answers, the demo starts the
embedded one itself (web, worker and beat subprocesses on a temporary ``var`` directory)
wired to its own sandbox. Which sandbox: the one ``INGEST_GRAPH_URL`` points at when it
answers the sandbox control API, else the one ``make run`` starts on port 8090 (so a running
service already configured for a sandbox downloads from it), otherwise one started in this
process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
from sqlalchemy import select

from ingest import accounts, migrate
from ingest.db import make_engine, make_session_factory, session_scope
from ingest.models import TERMINAL_STATES, MediaItem, MediaState, Provider
from ingest.settings import Settings, load_settings
from sandbox import payloads
from sandbox.payloads import sign

KB = 1024
MB = 1024 * KB
READY_TIMEOUT_SECONDS = 60.0
SEND_CONCURRENCY = 8
VERIFY_CONCURRENCY = 4
POLL_SECONDS = 0.25
SECRET_HEADER = "X-Demo-Webhook-Secret"  # noqa: S105 - a header name, not a secret

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
    """The demo could not run at all (as opposed to running and finding a loss)."""


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


# `make run` starts a sandbox here and points the service at it (see Procfile.dev).
MAKE_RUN_SANDBOX = f"http://127.0.0.1:{os.environ.get('SANDBOX_PORT', '8090')}/v21.0"


def _sandbox_base_from_graph_url(graph_url: str) -> str | None:
    """The sandbox serves Graph under ``/v21.0``: its root is the graph URL minus that."""
    parts = urlsplit(graph_url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        return None
    root = f"{parts.scheme}://{parts.netloc}"
    return root if answers(root, "/_sandbox/stats") else None


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

    def add_media(self, phone_number_id: str, media_type: str, size: int) -> SandboxMedia:
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


def register(settings: Settings, provider: Provider) -> DemoRegistration:
    """A throwaway instance (unique names) and an instance token, in the service's database."""
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
            accounts.add_instance(session, spec)
            token = accounts.create_token(session, instance=spec.name, label="ingest demo")
    finally:
        engine.dispose()
    return DemoRegistration(
        spec.name, spec.phone_number_id, api_key, token, app_secret, webhook_secret
    )


def plan(events: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    kinds = list(MEDIA_MIX)
    weights = [MEDIA_MIX[k][0] for k in kinds]
    chosen = rng.choices(kinds, weights=weights, k=events)
    # Every type at least once when there is room for it.
    for i, kind in enumerate(kinds[: min(events, len(kinds))]):
        chosen[i] = kind
    return [(kind, rng.randint(*MEDIA_MIX[kind][1])) for kind in chosen]


def send_all(
    service_url: str,
    sandbox: SandboxControl,
    reg: DemoRegistration,
    provider: Provider,
    items: list[tuple[str, int]],
) -> list[Sent]:
    http = httpx.Client(timeout=30.0)

    def send(n: int, kind: str, size: int) -> Sent:
        media = sandbox.add_media(reg.phone_number_id, kind, size)
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
        except httpx.HTTPError as exc:
            sent.state, sent.reason = "rejected", f"webhook_{type(exc).__name__}"
        return sent

    try:
        with ThreadPoolExecutor(SEND_CONCURRENCY) as pool:
            futures = [pool.submit(send, n, kind, size) for n, (kind, size) in enumerate(items)]
            return [f.result() for f in futures]
    finally:
        http.close()


def follow(
    settings: Settings, reg: DemoRegistration, sent: list[Sent], timeout: float, quiet: bool
) -> None:
    """Poll the rows (one query per round) until every accepted item is final, or timeout."""
    from tqdm import tqdm

    by_wamid = {s.wamid: s for s in sent if s.state != "rejected"}
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    deadline = time.monotonic() + timeout
    bar = tqdm(
        total=len(by_wamid),
        desc="to stored",
        unit="item",
        # A bar is for a person at a terminal; in a pipe or a log it is only noise.
        disable=quiet or not sys.stderr.isatty(),
        file=sys.stderr,
        mininterval=0.5,
    )
    try:
        done = 0
        while done < len(by_wamid) and time.monotonic() < deadline:
            with sessions() as session:
                instance = accounts.get_instance(session, reg.instance)
                rows = session.execute(
                    select(
                        MediaItem.message_id,
                        MediaItem.state,
                        MediaItem.failure_reason,
                        MediaItem.stored_at,
                    ).where(MediaItem.instance_id == instance.id)
                ).all()
            for message_id, state, reason, stored_at in rows:
                item = by_wamid.get(message_id)
                if item is not None:
                    item.state, item.reason, item.stored_at = state, reason, stored_at
            now_done = sum(1 for s in by_wamid.values() if s.state in TERMINAL_STATES)
            bar.update(now_done - done)
            done = now_done
            if done < len(by_wamid):
                time.sleep(POLL_SECONDS)
    finally:
        bar.close()
        engine.dispose()
    for item in by_wamid.values():
        if item.state not in TERMINAL_STATES:
            item.reason = item.reason or f"still_{item.state}"


def _get_respecting_limit(http: httpx.Client, url: str, **kwargs: Any) -> httpx.Response:
    """The archive API allows 100 requests a minute per token: wait when it says so."""
    for _ in range(10):
        response = http.get(url, **kwargs)
        if response.status_code != 429:
            return response
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 60.0))
    return response


def verify_all(service_url: str, reg: DemoRegistration, sent: list[Sent]) -> None:
    """Read each stored item back through the base64 API and compare it byte for byte."""
    http = httpx.Client(timeout=60.0, headers={"token": reg.token})

    def verify(item: Sent) -> None:
        params = {"messageId": item.wamid}
        found = _get_respecting_limit(
            http, f"{service_url}/api/chat/find-message/{reg.instance}", params=params
        )
        if found.status_code != 200:
            item.verified, item.problem = False, f"find-message answered {found.status_code}"
            return
        response = _get_respecting_limit(
            http, f"{service_url}/api/chat/base64/{reg.instance}", params=params
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
        elif body.get("media_type") != item.media.media_type:
            item.verified, item.problem = False, f"media_type {body.get('media_type')!r}"
        else:
            item.verified = True

    try:
        with ThreadPoolExecutor(VERIFY_CONCURRENCY) as pool:
            list(pool.map(verify, [s for s in sent if s.state == MediaState.STORED]))
    finally:
        http.close()


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


def print_summary(summary: dict[str, Any]) -> None:
    lat = summary["seconds_to_stored"]
    where = "embedded service (started by the demo)" if summary["embedded_service"] else ""
    click.echo(f"service     {summary['service']} {where}".rstrip())
    click.echo(f"provider    {summary['provider']}")
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
    verdict = "OK: nothing lost or corrupted" if demo_ok(summary) else "FAILED: see above"
    click.echo(verdict)


def demo_ok(summary: dict[str, Any]) -> bool:
    return bool(
        summary["sent"] > 0
        and summary["lost"] == 0
        and summary["corrupted"] == 0
        and summary["verified"] == summary["sent"]
    )


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
    help="The running service; when none answers, the demo starts the embedded one.",
)
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for rows.")
@click.option("--seed", default=1, show_default=True, help="Seed of the media mix.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo(events: int, provider: str, url: str, timeout: float, seed: int, as_json: bool) -> None:
    """Send N signed webhooks with real media from a sandbox provider and verify every item.

    Summary: sent, stored, failed by reason, throughput, p50/p95/p99 time from webhook to
    stored. Exit status 1 when anything was lost or corrupted.
    """
    chosen = Provider(provider)
    url = url.rstrip("/")

    def note(message: str) -> None:
        if not as_json:
            click.echo(message, err=True)

    with ExitStack() as stack:
        if answers(url):
            embedded = False
            settings = load_settings()
            sandbox_root = _sandbox_base_from_graph_url(
                settings.graph_url
            ) or _sandbox_base_from_graph_url(MAKE_RUN_SANDBOX)
            if sandbox_root is None:
                sandbox_root = stack.enter_context(in_process_sandbox())
                note(
                    f"using the service at {url} with a sandbox at {sandbox_root}; the "
                    "service must list 127.0.0.1 in INGEST_MEDIA_HOSTS"
                )
        else:
            embedded = True
            sandbox_root = stack.enter_context(in_process_sandbox())
            var_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-demo-")))
            env = {
                "INGEST_GRAPH_URL": f"{sandbox_root}/v21.0",
                "INGEST_D360_URL": f"{sandbox_root}/d360",
                "INGEST_MEDIA_HOSTS": "127.0.0.1,localhost",
                # The demo reads every item back at once; the per-token limit is not under test.
                "INGEST_API_RATE_LIMIT": "100000/minute",
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
        reg = register(settings, chosen)
        control.add_number(reg.phone_number_id, reg.api_key, chosen)
        note(f"instance {reg.instance} ({chosen}), sending {events} webhooks")
        sent = send_all(url, control, reg, chosen, plan(events, seed))
        follow(settings, reg, sent, timeout, quiet=as_json)
        verify_all(url, reg, sent)
        summary = summarise(sent, chosen, url, embedded)

    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        print_summary(summary)
    if not demo_ok(summary):
        sys.exit(1)


COMMANDS = (demo,)
