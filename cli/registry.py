"""Registry commands: accounts, instances, API tokens, and a look at media rows."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import click
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ingest import accounts
from ingest.db import make_engine, make_session_factory, session_scope
from ingest.events import has_control_character
from ingest.models import Instance, MediaItem, MediaState, Provider, utcnow
from ingest.secrets import KEY_VARIABLE, generate_key, secret_box
from ingest.settings import Settings, load_settings


@contextmanager
def _sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """A session factory on the configured database, for a command that runs several units
    of work; a registry error is the command's one-line error."""
    settings.ensure_var_dir()
    engine = make_engine(settings.database_url)
    try:
        yield make_session_factory(engine)
    except accounts.RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()


@contextmanager
def _session(settings: Settings | None = None) -> Iterator[Session]:
    with _sessions(settings or load_settings()) as sessions, session_scope(sessions) as session:
        yield session


@click.group()
def account() -> None:
    """Accounts group instances; an account token reaches all of them."""


def _account_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return accounts.check_account_name(value)
    except accounts.RegistryError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@account.command("add")
@click.argument("name", callback=_account_name)
def account_add(name: str) -> None:
    """Create an account."""
    with _session() as session:
        accounts.add_account(session, name)
    click.echo(f"account {name} created")


@click.group()
def instance() -> None:
    """WhatsApp numbers (instances) and their provider credentials."""


def _interactive() -> bool:
    return sys.stdin.isatty()


class SecretOption(click.Option):
    """A credential: from its flag, else its environment variable, else a hidden prompt.

    Flags are visible to every user of the machine (``ps``, shell history), so the variable
    and the prompt are the ways to keep a secret out of them. The prompt appears only on a
    terminal: a script that forgot the secret gets a usage error, never a hang or a secret
    read from whatever its standard input happens to hold.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        if kwargs.get("required"):
            kwargs.update(prompt=True, hide_input=True)
        elif "flag_value" in kwargs:
            # Optional, and prompted for only when its flag is given without a value.
            kwargs.update(prompt=True, prompt_required=False, hide_input=True)
        super().__init__(*args, **kwargs)

    def prompt_for_value(self, ctx: click.Context) -> Any:
        if not _interactive():
            raise click.MissingParameter(ctx=ctx, param=self)
        return super().prompt_for_value(ctx)


def _instance_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return accounts.check_instance_name(value)
    except accounts.RegistryError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


UNSIGNED_HELP = (
    "Accept webhooks that carry neither Meta's signature nor the shared-secret header. "
    "Anyone who can reach the service can then make it download with this instance's "
    "provider key and fill its queue."
)


def _secret_options(*, api_key_required: bool) -> Any:
    """The credential options of `instance add` and `instance update`, in that order."""

    def apply(command: Any) -> Any:
        # On update every secret is optional: given alone (`--api-key`) it is prompted for.
        optional = {} if api_key_required else {"is_flag": False, "flag_value": ""}
        prompted = (
            "prompted for on a terminal if not given"
            if api_key_required
            else "prompted for on a terminal when given without a value"
        )
        options = [
            click.option(
                "--api-key",
                cls=SecretOption,
                envvar="INGEST_INSTANCE_API_KEY",
                required=api_key_required,
                help=f"Graph bearer token or D360-API-KEY ({prompted}).",
                **optional,
            ),
            click.option(
                "--app-secret",
                cls=SecretOption,
                envvar="INGEST_INSTANCE_APP_SECRET",
                help="Meta app secret: X-Hub-Signature-256 is then required.",
                **optional,
            ),
            click.option(
                "--verify-token",
                cls=SecretOption,
                envvar="INGEST_INSTANCE_VERIFY_TOKEN",
                help="Token for Meta's GET verification handshake (stored hashed).",
                **optional,
            ),
            click.option(
                "--webhook-secret-header",
                help="Header a 360dialog webhook must carry (with --webhook-secret).",
            ),
            click.option(
                "--webhook-secret",
                cls=SecretOption,
                envvar="INGEST_INSTANCE_WEBHOOK_SECRET",
                help="Shared secret expected in that header (stored hashed).",
                **optional,
            ),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@instance.command("add")
@click.argument("name", callback=_instance_name)
@click.option("--provider", type=click.Choice([p.value for p in Provider]), required=True)
@click.option("--phone-number-id", required=True, help="Meta phone_number_id of the number.")
@_secret_options(api_key_required=True)
@click.option("--allow-unsigned-webhooks", "allow_unsigned", is_flag=True, help=UNSIGNED_HELP)
@click.option("--account", "account_name", default=accounts.DEFAULT_ACCOUNT, show_default=True)
def instance_add(
    name: str,
    provider: str,
    phone_number_id: str,
    api_key: str,
    app_secret: str | None,
    verify_token: str | None,
    webhook_secret_header: str | None,
    webhook_secret: str | None,
    allow_unsigned: bool,
    account_name: str,
) -> None:
    """Register a WhatsApp number under NAME.

    Its webhooks must prove where they come from: give --app-secret (Meta signs every
    webhook with it) or, for 360dialog, --webhook-secret-header and --webhook-secret.
    Secrets come from their INGEST_INSTANCE_* variables or a hidden prompt rather than the
    command line, which every user of the machine can see. API keys and app secrets are
    stored encrypted (INGEST_SECRET_KEY), the other secrets hashed.
    """
    if not (app_secret or webhook_secret or allow_unsigned):
        raise click.UsageError(
            f"instance {name} would take webhooks from anyone: give --app-secret (Meta's "
            "X-Hub-Signature-256) or --webhook-secret-header with --webhook-secret "
            "(360dialog), or pass --allow-unsigned-webhooks to accept that risk"
        )
    spec = accounts.InstanceSpec(
        name=name,
        provider=Provider(provider),
        phone_number_id=phone_number_id,
        api_key=api_key,
        app_secret=app_secret,
        verify_token=verify_token,
        webhook_secret_header=webhook_secret_header,
        webhook_secret=webhook_secret,
        account=account_name,
        allow_unsigned=allow_unsigned,
    )
    settings = load_settings()
    with _session(settings) as session:
        accounts.add_instance(session, spec, secret_box(settings))
    click.echo(f"instance {name} added ({provider}, phone number id {phone_number_id})")
    if allow_unsigned:
        click.echo(f"warning: instance {name} accepts unsigned webhooks", err=True)


@instance.command("update")
@click.argument("name")
@_secret_options(api_key_required=False)
@click.option(
    "--allow-unsigned-webhooks/--require-signed-webhooks",
    "allow_unsigned",
    default=None,
    help=f"{UNSIGNED_HELP} --require-signed-webhooks withdraws that (the instance then needs "
    "an app secret or a webhook secret).",
)
@click.option(
    "--retention-days",
    type=click.IntRange(min=1),
    help="Delete stored media this many days after receipt (hourly, by beat); the row stays, "
    "marked purged, and the archive answers 404 for it.",
)
@click.option("--no-retention", is_flag=True, help="Keep stored media for ever (the default).")
@click.option(
    "--callback-url",
    help="POST a signed event (Standard Webhooks) here when an item is stored, fails or "
    "expires. Its signing secret: --callback-secret / INGEST_INSTANCE_CALLBACK_SECRET, else "
    "the one the instance has, else a new one, printed once.",
)
@click.option("--no-callback-url", is_flag=True, help="Stop the callbacks (pending events fail).")
@click.option(
    "--callback-secret",
    cls=SecretOption,
    envvar="INGEST_INSTANCE_CALLBACK_SECRET",
    help="The callbacks' signing secret (`whsec_` and base64 of 24 to 64 bytes).",
    is_flag=False,
    flag_value="",
)
@click.option(
    "--new-callback-secret",
    is_flag=True,
    help="Replace the callbacks' signing secret with a new one, printed once.",
)
def instance_update(
    name: str,
    api_key: str | None,
    app_secret: str | None,
    verify_token: str | None,
    webhook_secret_header: str | None,
    webhook_secret: str | None,
    allow_unsigned: bool | None,
    retention_days: int | None,
    no_retention: bool,
    callback_url: str | None,
    no_callback_url: bool,
    callback_secret: str | None,
    new_callback_secret: bool,
) -> None:
    """Replace some of NAME's secrets (after a leak, or a new app secret at Meta); the ones
    not given stay as they are. A secret comes from its flag, its INGEST_INSTANCE_*
    variable, or a hidden prompt when its flag is given alone (`--api-key`). Web processes
    use a new secret within seconds."""
    changes = accounts.InstanceUpdate(
        api_key=api_key,
        app_secret=app_secret,
        verify_token=verify_token,
        webhook_secret_header=webhook_secret_header,
        webhook_secret=webhook_secret,
        allow_unsigned=allow_unsigned,
    )
    changed = [
        what
        for what, value in (
            ("api key", api_key),
            ("app secret", app_secret),
            ("verify token", verify_token),
            ("webhook secret header", webhook_secret_header),
            ("webhook secret", webhook_secret),
        )
        if value is not None
    ]
    if allow_unsigned is not None:
        changed.append("unsigned webhooks " + ("accepted" if allow_unsigned else "refused"))
    if retention_days is not None and no_retention:
        raise click.UsageError("--retention-days and --no-retention contradict each other")
    secrets_given = bool(changed)
    retention_given = retention_days is not None or no_retention
    if retention_given:
        changed.append(f"retention {_retention(retention_days)}")
    if callback_url is not None and no_callback_url:
        raise click.UsageError("--callback-url and --no-callback-url contradict each other")
    callback_given = callback_url is not None or no_callback_url
    if new_callback_secret and callback_url is None:
        raise click.UsageError("--new-callback-secret goes with --callback-url")
    # Read only beside --callback-url: a variable left over in the environment must not
    # refuse, or change, anything else.
    callback_secret = callback_secret if callback_url is not None else None
    rotating = bool(callback_secret) or new_callback_secret
    if callback_given:
        changed.append("callback URL " + ("removed" if no_callback_url else "set"))
    if not changed:
        raise click.UsageError("nothing to change: give at least one secret or flag")
    settings = load_settings()
    shown_secret = None
    with _session(settings) as session:
        box = secret_box(settings)
        updated = accounts.get_instance(session, name)
        if secrets_given:
            updated = accounts.update_instance(session, name, changes, box)
        if retention_given:
            updated = accounts.set_retention(session, name, retention_days)
        if callback_given:
            from ingest import callbacks

            kept = updated.callback_secret_encrypted
            secret = callback_secret or (None if rotating or kept is None else box.decrypt(kept))
            chosen = callbacks.configure(session, updated, callback_url, secret, box)
            shown_secret = chosen if chosen is not None and chosen != secret else None
        auth = _webhook_auth(updated)
        disconnected = not updated.connected
    # Names of what changed, never the values: a variable left over from another command
    # would otherwise change a secret unnoticed.
    click.echo(f"instance {name} updated: {', '.join(changed)} (webhooks: {auth})")
    if shown_secret is not None:
        # Alone on the last line, like a new token: the receiver needs it to check signatures.
        click.echo("the callbacks' signing secret (shown once):", err=True)
        click.echo(shown_secret)
    if disconnected and api_key is not None:
        # A provider 401 is what usually disconnects an instance; a new key does not undo it.
        click.echo(
            f"instance {name} is still disconnected: `ingest instance connect {name}` to "
            "download with the new key",
            err=True,
        )


@instance.command("remove")
@click.argument("name")
@click.option(
    "--purge",
    is_flag=True,
    help="Also delete its media rows and their stored objects (refused without it while "
    "the instance has media).",
)
def instance_remove(name: str, purge: bool) -> None:
    """Delete NAME and its own API tokens (its provider credentials go with it). Its
    webhooks are refused from then on."""
    from ingest.storage import storage_from_settings

    settings = load_settings()
    with _session(settings) as session:
        removed = accounts.remove_instance(
            session, storage_from_settings(settings), name, purge=purge
        )
    click.echo(
        f"instance {name} removed: {removed.media_rows} media row(s), {removed.objects} "
        f"stored object(s), {removed.tokens} token(s)"
    )


@instance.command("disconnect")
@click.argument("name")
def instance_disconnect(name: str) -> None:
    """Mark NAME disconnected: no provider calls for it, and the archive API answers 503
    for its media not yet stored (stored media is still served)."""
    with _session() as session:
        accounts.set_connected(session, name, False)
    click.echo(f"instance {name} disconnected")


@instance.command("connect")
@click.argument("name")
def instance_connect(name: str) -> None:
    """Mark NAME connected again (forgetting why it was disconnected)."""
    with _session() as session:
        accounts.set_connected(session, name, True)
    click.echo(f"instance {name} connected")


def _callback_origin(url: str) -> str:
    # The path and query may carry a receiver's token: the listing shows where, not how.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _retention(days: int | None) -> str:
    return "for ever" if days is None else f"{days} day{'s' if days != 1 else ''}"


def _one_line(text: str) -> str:
    """Outside text (a provider's error message) on one line of one column."""
    return "".join(" " if has_control_character(c) else c for c in text)


def _when(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


UNSIGNED_ACCEPTED = "UNSIGNED WEBHOOKS ACCEPTED"
NO_WEBHOOK_AUTH = "NO WEBHOOK AUTH: webhooks refused"


def _webhook_auth(row: Instance) -> str:
    checks = []
    if row.app_secret_encrypted:
        checks.append("signed")
    if row.webhook_secret_header and row.webhook_secret_hash:
        checks.append(f"secret-header={_one_line(row.webhook_secret_header)}")
    if checks:
        return "+".join(checks)
    return UNSIGNED_ACCEPTED if row.allow_unsigned else NO_WEBHOOK_AUTH


@instance.command("list")
def instance_list() -> None:
    """List instances (credentials are never printed): how each one's webhooks are
    authenticated (`signed`: Meta's signature; `secret-header=NAME`: 360dialog's shared
    secret; or, loudly, that unsigned webhooks are accepted or that it has no check and its
    webhooks are refused), and for a disconnected one since when and why (`operator`, or
    the outcome that made a worker disconnect it)."""
    unsigned = []
    with _session() as session:
        for row in accounts.list_instances(session):
            state = "connected" if row.connected else "disconnected"
            auth = _webhook_auth(row)
            if auth == UNSIGNED_ACCEPTED:
                unsigned.append(row.name)
            line = (
                f"{row.name}\t{row.provider}\t{row.phone_number_id}\t{state}\t{auth}\t"
                f"account={row.account.name}"
            )
            if row.retention_days is not None:
                line += f"\tretention={_retention(row.retention_days)}"
            if row.callback_url:
                line += f"\tcallback={_callback_origin(row.callback_url)}"
            if not row.connected:
                if row.disconnected_at is not None:
                    line += f"\tsince={_when(row.disconnected_at)}"
                line += f"\treason={_one_line(row.disconnected_reason or 'unrecorded')}"
            click.echo(line)
    if unsigned:
        click.echo(
            f"warning: {len(unsigned)} instance(s) accept unsigned webhooks from anyone who "
            f"reaches the service: {', '.join(unsigned)}",
            err=True,
        )


@click.group()
def token() -> None:
    """Archive API tokens (only their hash is stored)."""


def _rate_limit(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return accounts.check_rate_limit(value)
    except accounts.RegistryError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@token.command("create")
@click.option("--instance", "instance_name", help="Token for one instance.")
@click.option("--account", "account_name", help="Token for every instance of an account.")
@click.option("--label", help="A note to recognise the token by.")
@click.option(
    "--rate-limit",
    callback=_rate_limit,
    help="This token's archive API limit, e.g. '1000/minute' (default: INGEST_API_RATE_LIMIT).",
)
def token_create(
    instance_name: str | None,
    account_name: str | None,
    label: str | None,
    rate_limit: str | None,
) -> None:
    """Create a token. It is printed once, alone on the last line."""
    if (instance_name is None) == (account_name is None):
        raise click.UsageError("give exactly one of --instance or --account")
    with _session() as session:
        value = accounts.create_token(
            session,
            instance=instance_name,
            account=account_name,
            label=label,
            rate_limit=rate_limit,
        )
    scope = f"instance {instance_name}" if instance_name else f"account {account_name}"
    click.echo(f"token for {scope} (shown once, store it now):")
    click.echo(value)


@token.command("list")
@click.option("--instance", "instance_name", help="Only tokens that can read this instance.")
@click.option(
    "--account", "account_name", help="Only the account's tokens and its instances' tokens."
)
def token_list(instance_name: str | None, account_name: str | None) -> None:
    """List tokens: id, label, scope, created, rate limit (never the token or its hash)."""
    if instance_name is not None and account_name is not None:
        raise click.UsageError("give at most one of --instance or --account")
    with _session() as session:
        rows = accounts.list_tokens(session, instance=instance_name, account=account_name)
    if not rows:
        click.echo("no tokens")
        return
    click.echo("id\tlabel\tscope\tcreated\trate limit")
    for row in rows:
        label = _one_line(row.label) if row.label else "-"
        click.echo(
            f"{row.id}\t{label}\t{row.scope}\t{_when(row.created_at)}\t"
            f"{row.rate_limit or 'default'}"
        )


@token.command("revoke")
@click.argument("token_id", metavar="ID", type=int)
def token_revoke(token_id: int) -> None:
    """Delete token ID (see `ingest token list`): refused from the next request on."""
    with _session() as session:
        accounts.revoke_token(session, token_id)
    click.echo(f"token {token_id} revoked")


@click.group()
def media() -> None:
    """Inspect media rows; erase one, or run the retention pass now."""


@media.command("list")
@click.option("--instance", "instance_name")
@click.option("--state", type=click.Choice([state.value for state in MediaState]))
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def media_list(instance_name: str | None, state: str | None, limit: int) -> None:
    """Newest media rows: id, instance, message id, type, state, reason, size."""
    with _session() as session:
        query = select(MediaItem).order_by(MediaItem.id.desc()).limit(limit)
        if instance_name:
            query = query.where(
                MediaItem.instance_id == accounts.get_instance(session, instance_name).id
            )
        if state:
            query = query.where(MediaItem.state == state)
        rows = [
            (
                row.id,
                row.instance.name,
                row.message_id,
                row.media_type,
                row.state,
                row.failure_reason or "-",
                "-" if row.size is None else row.size,
            )
            for row in session.scalars(query)
        ]
    if not rows:
        click.echo("no media")
        return
    click.echo("id\tinstance\tmessage id\ttype\tstate\treason\tsize")
    for values in rows:
        click.echo("\t".join(str(value) for value in values))


@media.command("erase")
@click.option("--instance", "instance_name", required=True)
@click.option("--message-id", required=True, help="The message (wamid) whose media goes.")
@click.option(
    "--by",
    help="Who asked, for the row's audit (default: `cli:` and the operating-system user).",
)
def media_erase(instance_name: str, message_id: str, by: str | None) -> None:
    """Erase one message's media for a right-to-erasure request: the stored object is
    deleted, the caption, filename and sender cleared, and the row kept as `erased` with who
    and when. Safe to repeat; a later webhook for the message does not bring it back."""
    import getpass

    from ingest import removal
    from ingest.storage import StorageError, storage_from_settings

    settings = load_settings()
    with _sessions(settings) as sessions:
        with session_scope(sessions) as session:
            instance_id = accounts.get_instance(session, instance_name).id
        try:
            erasure = removal.erase(
                sessions,
                storage_from_settings(settings),
                instance_id=instance_id,
                message_id=message_id,
                by=by or f"cli:{getpass.getuser()}",
                now=utcnow(),
            )
        except removal.NotFound:
            raise click.ClickException(
                f"instance {instance_name!r} has no message {message_id!r}"
            ) from None
        except StorageError as exc:
            raise click.ClickException(
                f"the row is erased, but deleting its object failed ({exc}): run the command again"
            ) from None
    again = "" if erasure.newly_erased else " (erased before; objects deleted again)"
    click.echo(
        f"erased {instance_name} {message_id} at {_when(erasure.erased_at)} by "
        f"{erasure.erased_by}: {erasure.objects_deleted} object(s) deleted{again}"
    )


@media.command("purge")
@click.option("--dry-run", is_flag=True, help="Count what would be purged; change nothing.")
def media_purge(dry_run: bool) -> None:
    """Run the retention pass now (beat runs it hourly): stored media older than its
    instance's `--retention-days` is deleted and its row marked purged."""
    from ingest import removal
    from ingest.storage import storage_from_settings

    settings = load_settings()
    with _sessions(settings) as sessions:
        report = removal.purge_past_retention(
            sessions, storage_from_settings(settings), utcnow(), dry_run=dry_run
        )
    verb = "would purge" if dry_run else "purged"
    for name, count in sorted(report.by_instance.items()):
        click.echo(f"{name}\t{verb} {count}")
    click.echo(
        f"{verb} {report.purged} item(s)" + (f", {report.failed} failed" if report.failed else "")
    )
    if report.failed:
        sys.exit(1)


@click.group("secrets")
def secrets_group() -> None:
    """The key that encrypts provider API keys and app secrets at rest.

    INGEST_SECRET_KEY holds Fernet keys, comma-separated: the first encrypts, every one
    decrypts. Without it, the embedded default (SQLite) generates one into secret.key beside
    the database file; a server database (PostgreSQL) needs INGEST_SECRET_KEY.

    Rotation: put a new key (`ingest secrets generate-key`) first in INGEST_SECRET_KEY and
    keep the old one after it (with the embedded default, the old one is the content of
    secret.key), restart web and worker processes with it, run `ingest secrets rotate`, then
    remove the old key from INGEST_SECRET_KEY and restart again.
    """


@secrets_group.command("generate-key")
def secrets_generate_key() -> None:
    """Print a new Fernet key, alone on standard output (for INGEST_SECRET_KEY)."""
    click.echo(generate_key())


@secrets_group.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored API key and app secret with the first key of
    INGEST_SECRET_KEY, in one transaction. Afterwards the other keys can be dropped."""
    settings = load_settings()
    box = secret_box(settings)
    with _session(settings) as session:
        count = accounts.rotate_secrets(session, box)
    click.echo(
        f"re-encrypted {count} secret(s) with the first key of {box.source}"
        + (
            f"; the other {box.key_count - 1} key(s) can now be removed"
            if box.key_count > 1
            else ""
        )
    )
    if box.source != KEY_VARIABLE:
        click.echo(f"note: {KEY_VARIABLE} is not set; the key in use is {box.source}", err=True)


COMMANDS = (account, instance, token, media, secrets_group)
