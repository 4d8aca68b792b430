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

import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
from sqlalchemy import select

from cli.demo_checks import (
    DemoError,
    check_shared_database,
    database_problem,
    error_message,
    find_sandbox,
    no_sandbox_problem,
    probe_problem,
    read_probe,
)
from cli.demo_embedded import start_embedded
from cli.demo_http import resend_on_reset
from cli.demo_summary import Cleanup, cleanup_summary, demo_ok, print_summary, summarise
from cli.demo_verify import POLL_SECONDS, Sent, Verifier
from ingest.db import make_engine, make_session_factory
from ingest.models import TERMINAL_STATES, Instance, MediaItem, MediaState, Provider
from ingest.settings import Settings, load_settings
from sandbox import processes
from sandbox.client import SandboxControl
from sandbox.payloads import varied_message, webhook_body
from sandbox.provider import SandboxMedia
from sandbox.registration import DemoRegistration, register, remove_registration

KB = 1024
MB = 1024 * KB
SEND_CONCURRENCY = 8
# The demo reads every item back at once: its own token gets a limit of its own (what
# `ingest token create --rate-limit` sets), the deployment's INGEST_API_RATE_LIMIT stays.
DEMO_RATE_LIMIT = "100000/minute"
# How long the probe webhook's row may take to be stored before the demo gives up on the
# service downloading from its sandbox.
PROBE_TIMEOUT_SECONDS = 20.0
PROBE_SIZE = 20 * KB

# A realistic inbound mix: mostly photos, some voice notes and stickers, fewer videos and
# documents (the large ones). Weight, then size range in bytes.
MEDIA_MIX: dict[str, tuple[int, tuple[int, int]]] = {
    "image": (40, (40 * KB, 400 * KB)),
    "audio": (20, (20 * KB, 600 * KB)),
    "sticker": (15, (10 * KB, 90 * KB)),
    "video": (10, (300 * KB, 3 * MB)),
    "document": (15, (30 * KB, 4 * MB)),
}


# --- the run ---------------------------------------------------------------------------


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
    body = webhook_body(reg.phone_number_id, varied_message(media, wamid, "15551234567", n))
    path, headers = reg.webhook_route(body)
    sent = Sent(media=media, wamid=wamid, sent_at=datetime.now(UTC))
    try:
        response = resend_on_reset(http.post, service_url + path, content=body, headers=headers)
        sent.status = response.status_code
        if response.status_code != 200:
            sent.state, sent.reason = "rejected", f"webhook_{response.status_code}"
            sent.problem = error_message(response)
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
        if processes.answers(url + "/healthz"):
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
            settings, url, sandbox_root, var_dir = start_embedded(
                stack, url, sandbox_url, keep, note
            )

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
