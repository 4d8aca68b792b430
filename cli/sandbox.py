"""``ingest sandbox``: the sandbox provider in the foreground, for a service to download from;
``ingest sandbox send``: one media item from it, announced to the service by a signed webhook.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import click
import httpx

from cli.demo_checks import missing_database
from ingest import accounts
from ingest.db import make_engine, make_session_factory
from ingest.models import Provider
from ingest.secrets import secret_box
from ingest.settings import Settings, hide_password, load_settings
from sandbox import payloads
from sandbox.client import SandboxControl, SandboxNotFound, find_sandbox
from sandbox.provider import SandboxConfig, SandboxMedia, SandboxProvider
from sandbox.server import make_sandbox_server, media_hosts_for

WEBHOOK_SECRET_VARIABLE = "INGEST_INSTANCE_WEBHOOK_SECRET"  # noqa: S105 - a variable's name


class SendError(click.ClickException):
    """Something the user must set or start before `send` can work: exit status 2."""

    exit_code = 2


class WebhookRefused(click.ClickException):
    """The service did not take the webhook: exit status 1."""


@click.group(invoke_without_command=True)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--url-lifetime", default=300.0, show_default=True, help="Signed URL lifetime, s.")
@click.option("--latency-ms", default=0.0, show_default=True, help="Added to every request.")
@click.option("--bandwidth", type=int, default=None, help="Download bytes per second.")
@click.option("--quiet", is_flag=True, help="No access log (benchmarks: it costs CPU per request).")
@click.pass_context
def sandbox(
    ctx: click.Context,
    port: int,
    host: str,
    url_lifetime: float,
    latency_ms: float,
    bandwidth: int | None,
    quiet: bool,
) -> None:
    """Run a local stand-in for the WhatsApp media provider (Graph, 360dialog, CDN).

    Prints the INGEST_* settings a service needs to download from it. Control it over HTTP:
    POST /_sandbox/numbers, /_sandbox/media, /_sandbox/faults, /_sandbox/reset; GET
    /_sandbox/stats. `ingest sandbox send` has one media item sent to an instance.
    """
    if ctx.invoked_subcommand is not None:
        return
    config = SandboxConfig(
        url_lifetime_seconds=url_lifetime, latency_ms=latency_ms, bandwidth=bandwidth
    )
    server = make_sandbox_server(SandboxProvider(config), host, port, quiet=quiet)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    base = f"http://{shown}:{server.port}"
    click.echo(f"INGEST_GRAPH_URL={base}/{config.graph_version}")
    click.echo(f"INGEST_D360_URL={base}/d360")
    click.echo(f"INGEST_MEDIA_HOSTS={','.join(media_hosts_for(base))}")
    click.echo(f"sandbox provider at {base} (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@dataclass(frozen=True)
class InstanceRow:
    """What `send` needs of an instance, read from the service's database."""

    name: str
    provider: Provider
    phone_number_id: str
    api_key: str
    app_secret: str | None
    webhook_secret_header: str | None
    webhook_secret_hash: str | None

    def __repr__(self) -> str:  # credentials stay out of reprs
        return f"InstanceRow({self.name!r}, {self.provider}, {self.phone_number_id!r})"


def read_instance(settings: Settings, name: str) -> InstanceRow:
    missing = missing_database(settings)
    if missing is not None:
        raise SendError(
            f"no database here: {missing} does not exist; run this from the directory of "
            "`make run`, or set the service's INGEST_VAR_DIR or INGEST_DATABASE_URL"
        )
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            row = accounts.find_instance(session, name)
            if row is None:
                shown = hide_password(settings.database_url)
                raise SendError(
                    f"no instance named {name!r} in {shown}: add it with `ingest instance add`"
                )
            # Decrypted with the service's key (its settings): the sandbox must be told the
            # key the worker will send, and the webhook signed as Meta would sign it.
            box = secret_box(settings)
            return InstanceRow(
                name=row.name,
                provider=Provider(row.provider),
                phone_number_id=row.phone_number_id,
                api_key=box.decrypt(row.api_key_encrypted),
                app_secret=(
                    box.decrypt(row.app_secret_encrypted) if row.app_secret_encrypted else None
                ),
                webhook_secret_header=row.webhook_secret_header,
                webhook_secret_hash=row.webhook_secret_hash,
            )
    finally:
        engine.dispose()


def webhook_headers(
    instance: InstanceRow, body: bytes, environ: Mapping[str, str]
) -> dict[str, str]:
    """The headers that authenticate ``body`` as the instance's provider would send it:
    Meta's signature with the app secret, the shared-secret header with its secret (stored
    only hashed: it comes from INGEST_INSTANCE_WEBHOOK_SECRET)."""
    headers = {"Content-Type": "application/json"}
    if instance.app_secret:
        headers["X-Hub-Signature-256"] = payloads.sign(body, instance.app_secret)
    if instance.webhook_secret_header and instance.webhook_secret_hash:
        secret = environ.get(WEBHOOK_SECRET_VARIABLE)
        if not secret:
            raise SendError(
                f"instance {instance.name} takes webhooks only with its shared secret in "
                f"{instance.webhook_secret_header}, which is stored hashed: export "
                f"{WEBHOOK_SECRET_VARIABLE} (the secret given to `ingest instance add`)"
            )
        if not accounts.secret_matches(secret, instance.webhook_secret_hash):
            raise SendError(
                f"{WEBHOOK_SECRET_VARIABLE} is not the webhook secret of instance {instance.name}"
            )
        headers[instance.webhook_secret_header] = secret
    return headers


@dataclass(frozen=True)
class Webhook:
    path: str
    body: bytes
    message_id: str


def webhook_for(instance: InstanceRow, media: SandboxMedia) -> Webhook:
    """The path to post to and the exact body of one inbound media message for ``media``."""
    message_id = payloads.wamid()
    message = payloads.message_for(media, message_id=message_id)
    envelope = payloads.webhook(instance.phone_number_id, messages=[message])
    if instance.provider is Provider.D360:
        # 360dialog posts to the URL configured for the number, with its slashes escaped.
        body = payloads.encode(envelope, escape_slashes=True)
        return Webhook(f"/webhook/{instance.name}", body, message_id)
    return Webhook("/webhook", payloads.encode(envelope), message_id)


def _sandbox_failed(root: str, exc: httpx.HTTPError) -> SendError:
    if isinstance(exc, httpx.HTTPStatusError):
        return SendError(
            f"the sandbox at {root} answered {exc.response.status_code}: "
            f"{exc.response.text.strip()[:200]}"
        )
    return SendError(f"the sandbox at {root} stopped answering: {exc}")


@sandbox.command("send")
@click.option("--instance", "instance_name", required=True, help="The instance to send to.")
@click.option(
    "--type",
    "media_type",
    type=click.Choice(payloads.MEDIA_TYPES),
    default="image",
    show_default=True,
)
@click.option(
    "--size", type=click.IntRange(min=1), help="Bytes of media (default: the sample's own)."
)
@click.option(
    "--sandbox",
    "sandbox_url",
    metavar="URL",
    help="Root URL of the sandbox the service downloads from. Default: INGEST_GRAPH_URL's "
    "when local, else make run's (SANDBOX_PORT, 8090).",
)
@click.option(
    "--url",
    "service_url",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The service that receives the webhook.",
)
def send(
    instance_name: str,
    media_type: str,
    size: int | None,
    sandbox_url: str | None,
    service_url: str,
) -> None:
    """One media item from the sandbox, announced to the service by a signed webhook.

    The sandbox is told the instance's phone number id and API key (read from its row in
    the database, so the sandbox knows the key the service will use), serves one item,
    and the webhook for it is posted as the provider would: signed with the instance's
    app secret (X-Hub-Signature-256), or with its shared-secret header (360dialog; the
    secret from INGEST_INSTANCE_WEBHOOK_SECRET). The message id is the only line on
    stdout (what happened goes to stderr). Run it with the service's settings (from the
    directory of `make run`).
    """
    settings = load_settings()
    instance = read_instance(settings, instance_name)
    try:
        root = find_sandbox(sandbox_url, settings.graph_url, os.environ)
    except SandboxNotFound as exc:
        raise SendError(str(exc)) from None
    if root is None:
        raise SendError(
            "no sandbox answers where the service's may be (INGEST_GRAPH_URL, port "
            f"{os.environ.get('SANDBOX_PORT') or '8090'}): start `make run` or `ingest "
            "sandbox`, or pass --sandbox URL"
        )
    control = SandboxControl(root)
    try:
        control.add_number(instance.phone_number_id, instance.api_key, instance.provider)
        media = control.add_media(instance.phone_number_id, media_type, size)
    except httpx.HTTPError as exc:
        raise _sandbox_failed(root, exc) from None
    finally:
        control.close()
    webhook = webhook_for(instance, media)
    headers = webhook_headers(instance, webhook.body, os.environ)
    # What happened goes to stderr: `MID=$(ingest sandbox send ...)` shows it and keeps
    # only the message id.
    click.echo(
        f"sandbox {root} serves {media.media_type} {media.media_id} for {instance.name}: "
        f"{media.mime_type}, {media.file_size} bytes, sha256 {media.sha256}",
        err=True,
    )
    target = service_url.rstrip("/") + webhook.path
    try:
        response = httpx.post(target, content=webhook.body, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        raise WebhookRefused(
            f"no service answers at {service_url} ({type(exc).__name__}): start `make run`, "
            "or pass --url"
        ) from None
    if response.status_code != 200:
        raise WebhookRefused(_refusal(response, target, instance, settings))
    click.echo(f"webhook accepted by {target} (200)", err=True)
    click.echo(webhook.message_id)


def _refusal(
    response: httpx.Response, target: str, instance: InstanceRow, settings: Settings
) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200]
    line = f"the service answered {response.status_code} ({message}) to the webhook at {target}"
    if response.status_code == 404:
        shown = hide_password(settings.database_url)
        line += (
            f": it does not know instance {instance.name} (phone number id "
            f"{instance.phone_number_id}), which is in {shown}; give this command the "
            "service's INGEST_VAR_DIR or INGEST_DATABASE_URL"
        )
    return line


COMMANDS = (sandbox,)
