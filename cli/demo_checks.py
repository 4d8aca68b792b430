"""What ``ingest demo`` checks before it sends the many webhooks, and the one line it says when
a check fails: a sandbox answers, the service shares the demo's database (the demo's token is
known to it) and downloads from the demo's sandbox (the probe webhook's row is stored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import click
import httpx
from sqlalchemy import select
from sqlalchemy.engine import make_url

from cli.demo_http import resend_on_reset
from ingest.archive import NO_MEDIA
from ingest.db import make_engine, make_session_factory
from ingest.models import TERMINAL_STATES, Instance, MediaItem, MediaState
from ingest.settings import Settings, hide_password
from sandbox import client
from sandbox.client import default_sandbox_candidates
from sandbox.registration import DemoRegistration


class DemoError(click.ClickException):
    """The demo could not run at all (as opposed to running and finding a loss): exit status
    2, one line saying what to set or where to run it."""

    exit_code = 2


# --- which sandbox ----------------------------------------------------------------------


def find_sandbox(explicit: str | None, graph_url: str, environ: Mapping[str, str]) -> str | None:
    """:func:`sandbox.client.find_sandbox`, a sandbox given that does not answer a DemoError."""
    try:
        return client.find_sandbox(explicit, graph_url, environ)
    except client.SandboxNotFound as exc:
        raise DemoError(str(exc)) from None


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


def error_message(response: httpx.Response) -> str | None:
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
        response = resend_on_reset(
            http.get,
            f"{service_url}/api/chat/find-message/{reg.instance}",
            params={"messageId": "wamid.DEMO-NOT-SENT"},
            headers={"token": reg.token},
        )
    except httpx.HTTPError as exc:
        raise DemoError(f"the service at {service_url} stopped answering: {exc}") from None
    problem = shared_database_problem(
        response.status_code, error_message(response), service_url, settings.database_url
    )
    if problem:
        raise DemoError(problem)


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
