"""One settings object, built once from defaults plus ``INGEST_*`` environment variables.

Every process (web, worker, beat, CLI) calls :func:`load_settings` at start-up. A bad value,
or an ``INGEST_*`` name that is no setting (a typo), stops the process with one line naming
the variable (:class:`ConfigError`), never a stack trace on the first request. Tests build
:class:`Settings` explicitly instead.

Why one module of this size: every variable an operator can set is here, each beside its
default, bounds and the check that refuses a bad value; one place to read the whole
configuration surface.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024

DEFAULT_MEDIA_HOSTS = (
    "graph.facebook.com",
    "lookaside.fbsbx.com",
    "waba-v2.360dialog.io",
)


# INGEST_* variables that are not settings, and who reads each. Any other INGEST_* name is a
# typo and stops the process (INGEST_DATABSE_URL was once dropped silently: the service ran on
# SQLite). A new variable read outside Settings goes here, with its reader.
NOT_SETTINGS_PREFIXES = (
    # The test suite: INGEST_TEST_DATABASE_URL, _REDIS_URL, _AMQP_URL, _REQUIRE_SERVICES
    # (tests/conftest.py, tests/tasks/, .ci/run, the README's Development section).
    "INGEST_TEST_",
    # `ingest instance add`/`update`: a number's secrets, kept off the command line
    # (cli/registry.py: _API_KEY, _APP_SECRET, _VERIFY_TOKEN, _WEBHOOK_SECRET).
    "INGEST_INSTANCE_",
)
NOT_SETTINGS_NAMES = frozenset(
    {
        # Set by `ingest worker` for each of its child processes: the Celery node name
        # (cli/service.py); the fault and outage tests set it for their workers too.
        "INGEST_WORKER_NODE_NAME",
        # The fault tests' report file (tests/faults/harness.py).
        "INGEST_FAULTS_REPORT",
    }
)

# Database schemes and the driver module each needs: only those that work are accepted.
# Plain ``postgresql://`` is rewritten to psycopg 3, a dependency (the validators below):
# SQLAlchemy 2.0 would pick psycopg2 for it, which is not.
_DATABASE_DRIVERS = {
    "sqlite": "sqlite3",
    "postgresql": "psycopg",
    "postgresql+psycopg": "psycopg",
    "postgresql+psycopg2": "psycopg2",
}
_BROKER_SCHEMES = ("redis", "rediss", "amqp", "pyamqp", "memory")


class ConfigError(Exception):
    """A setting is invalid; the message is one line that names the variable."""


def split_media_host(entry: str) -> tuple[str, int | None]:
    """One ``media_hosts`` entry as ``(host, port)``; port None means the scheme's default.

    Forms: ``name``, ``.suffix`` (any name ending in it), an IPv4 address or ``[IPv6]``, each
    optionally with ``:port``; a bare IPv6 address (no port) is read as written. The host
    comes back canonical: lowercase, no root dot, an address in its one standard spelling.
    Without a port an entry allows only 80 (http) and 443 (https): a bare ``127.0.0.1``
    once let a webhook URL reach every local service (Redis on 6379 included).
    """
    text = entry.strip().lower()
    if "/" in text or "@" in text:
        raise ValueError(f"{entry!r}: give a host (host or host:port), not a URL")
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r} is not host, host:port or [IPv6]:port")
        port_text = rest[1:] if rest else None
        if _ip(host) is None or ":" not in host:
            raise ValueError(f"{entry!r}: only an IPv6 address goes in brackets")
    elif text.count(":") > 1:
        host = text  # a bare IPv6 address: it cannot carry a port without brackets
        if _ip(host) is None:
            raise ValueError(f"{entry!r} is not host, host:port or [IPv6]:port")
    else:
        host, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
    port: int | None = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdecimal() and 0 < int(port_text) < 65536):
            raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    address = _ip(host)
    if address is not None:
        return address, port
    name = host.rstrip(".")
    label = name.removeprefix(".")
    if not label or not _HOST_NAME.fullmatch(label):
        raise ValueError(f"{entry!r} is not host, host:port or [IPv6]:port")
    return name, port


def format_media_host(host: str, port: int | None) -> str:
    """The one spelling of an entry (``[::1]:8090``, ``127.0.0.1:8090``, ``.example.com``)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


# Labels of letters, digits and hyphens (IDNA names in their ASCII form): no scheme, path,
# user info or wildcard, which an entry was never meant to carry.
_HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INGEST_", extra="ignore", frozen=True)

    # Where the embedded defaults keep their files (SQLite, broker, local media).
    var_dir: Path = Path("var")

    database_url: str = ""
    broker_url: str = ""
    # Prefix of every key the Redis broker writes, so deployments (or test runs) can share a
    # Redis database.
    broker_prefix: str = ""
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    redis_url: str | None = None
    # Prefix of every Redis key this service writes, so several deployments (or test runs)
    # can share one Redis.
    redis_prefix: str = "ingest"

    graph_url: str = "https://graph.facebook.com/v21.0"
    d360_url: str = "https://waba-v2.360dialog.io"
    media_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MEDIA_HOSTS)
    )

    # Webhook receiver.
    webhook_max_bytes: int = Field(default=4 * MiB, gt=0)
    # Phone number ids and media items one webhook body may name, checked before any
    # database lookup (a provider's batches are far smaller).
    webhook_max_items: int = Field(default=1000, gt=0)

    # Download rules (provider-media-constraints.md). The webhook URL lives 5 minutes; we
    # stop trusting it a little earlier so a download never starts on a dying URL.
    url_fresh_seconds: float = Field(default=270.0, gt=0)
    media_retention_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_media_bytes: int = Field(default=100 * MiB, gt=0)
    # Items whose stated size (or type) is large go to their own queue.
    large_media_bytes: int = Field(default=5 * MiB, gt=0)
    http_timeout_seconds: float = Field(default=30.0, gt=0)

    # Work leases and retries. The lease must outlive the task's hard time limit.
    lease_seconds: float = Field(default=900.0, gt=0)
    task_soft_time_limit: float = Field(default=600.0, gt=0)
    task_time_limit: float = Field(default=660.0, gt=0)
    # Leases that may run out (the worker died or was killed mid-attempt) before the row is
    # failed as worker_lost: a file that keeps killing its worker. Ordinary failed attempts
    # (throttles, timeouts) do not count; they retry until the 7 days pass.
    max_lease_losses: int = Field(default=3, gt=0)
    retry_base_seconds: float = Field(default=15.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    reconcile_interval_seconds: float = Field(default=60.0, gt=0)

    # Provider error budget per phone number (error-based throttle: 20 errors / 60 min
    # blocks media GETs for 30 min; 360dialog: 5 failed lookups / hour blocks for an hour).
    # We stop one short of each threshold.
    error_budget_window_seconds: float = Field(default=3600.0, gt=0)
    error_budget_media: int = Field(default=19, gt=0)
    error_budget_lookup_360dialog: int = Field(default=4, gt=0)
    # A worker that finds a number's budget full only because of calls still in flight
    # waits this long at most for one of them to end, rather than deferring the row.
    error_budget_wait_seconds: float = Field(default=10.0, ge=0)

    # Worker processes.
    worker_concurrency: int = Field(default=16, gt=0)
    worker_pool: str = "threads"
    # SIGTERM: transfers still running after this long are abandoned (their rows released
    # for another worker), so a stop ends within it; under Kubernetes' default 30 s grace.
    worker_shutdown_seconds: float = Field(default=25.0, gt=0)
    # Touched every few seconds while the worker's consumer runs (`ingest worker-alive`).
    # Default: <var_dir>/worker.heartbeat.
    worker_heartbeat_file: Path | None = None
    # The wake-up relay (ingest.wake_relay) in each worker process looks for newly committed
    # rows this often: the longest a new row waits for its wake-up, and the gap between
    # passes under load.
    relay_poll_seconds: float = Field(default=0.05, gt=0)
    # Rows named by one wake-up message at most: one message, one claim's worth of Celery
    # overhead, for several rows, run side by side. A message carries at most the rows a
    # worker process runs at once (rows_side_by_side), and wake_batch only in a backlog of
    # more than wake_batch x worker_concurrency of them (ingest.queues.wake_ups).
    wake_batch: int = Field(default=16, gt=0)
    # Consecutive object-store failures that pause claiming, and how often it is probed then.
    storage_breaker_failures: int = Field(default=5, gt=0)
    storage_breaker_reset_seconds: float = Field(default=30.0, gt=0)

    # Web processes.
    # gunicorn's own rule of thumb, (2 x cores) + 1: the receiver waits on the database's
    # commit, so more processes than cores keep the CPUs busy.
    web_workers: int = Field(default_factory=lambda: 2 * (os.cpu_count() or 1) + 1, gt=0)
    # More than one thread selects gunicorn's threaded worker. Its liveness check does not
    # depend on requests finishing, so a large base64 body streamed to a slow reader for
    # minutes is not killed at the worker timeout, and it holds one thread, not a process.
    web_threads: int = Field(default=4, gt=0)
    # A client that takes longer than this to send its headers, and again its body, is cut
    # (the threaded worker; gunicorn itself has no such limit). Put a buffering proxy in front.
    web_read_timeout_seconds: float = Field(default=15.0, gt=0)
    # Proxies in front that set X-Forwarded-For (0: none; the peer address is the client's).
    # The failed-authentication limit counts per client address: behind a proxy, without
    # this, every client shares the proxy's address.
    web_forwarded_hops: int = Field(default=0, ge=0)

    # Downstream callbacks (ingest.callbacks). The operator names the callback URL, so any
    # host and port may be used, but the addresses it resolves to must be public unless the
    # literal address is listed here (``address:port``, or without a port for 80 and 443),
    # the rule media downloads follow.
    callback_private_addresses: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Per phase (connect, write, read) of one POST.
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    # An event not delivered this long after it was created is given up (``failed``).
    callback_give_up_hours: float = Field(default=24.0, gt=0)
    # How often each worker process looks for events that are due.
    callback_interval_seconds: float = Field(default=2.0, gt=0)

    # Archive API.
    api_rate_limit: str = "100/minute"
    # Failed authentications (archive API tokens, webhook signatures), per client address
    # and for the whole deployment: guessing costs the guesser, not the database.
    auth_failure_rate_limit: str = "20/minute"
    auth_failure_global_rate_limit: str = "600/minute"
    base64_max_bytes: int = Field(default=128 * MiB, gt=0)

    # Encrypts provider API keys and app secrets at rest (Fernet keys, comma-separated: the
    # first encrypts, every one decrypts, for rotation). Embedded default: generated under
    # var_dir on first use.
    secret_key: SecretStr | None = None
    # A bearer token that /metrics requires when set.
    metrics_token: SecretStr | None = None

    log_level: str = "INFO"
    log_format: str = "text"

    @field_validator("database_url")
    @classmethod
    def _default_postgresql_driver(cls, value: str) -> str:
        return _with_psycopg(value, "postgresql")

    @field_validator("broker_url")
    @classmethod
    def _default_broker_postgresql_driver(cls, value: str) -> str:
        # kombu hands what follows ``sqla+`` to SQLAlchemy's create_engine.
        return _with_psycopg(value, "sqla+postgresql")

    @field_validator("media_hosts", "callback_private_addresses", mode="before")
    @classmethod
    def _parse_host_lists(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("media_hosts")
    @classmethod
    def _canonical_hosts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one host")
        return [format_media_host(*split_media_host(entry)) for entry in value]

    @field_validator("callback_private_addresses")
    @classmethod
    def _literal_addresses(cls, value: list[str]) -> list[str]:
        entries = [split_media_host(entry) for entry in value]
        for host, _port in entries:
            if _ip(host) is None:
                raise ValueError(f"{host!r}: list addresses (address or address:port), not names")
        return [format_media_host(host, port) for host, port in entries]

    @field_validator("graph_url", "d360_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _optional_http_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        assert value is not None
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("api_rate_limit", "auth_failure_rate_limit", "auth_failure_global_rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parsed = parse_many(value)
        except ValueError:
            raise ValueError(f"must be a rate such as '100/minute', got {value!r}") from None
        if len(parsed) != 1 or parsed[0].amount <= 0:
            raise ValueError(f"must be one positive rate such as '100/minute', got {value!r}")
        return value

    @field_validator("metrics_token", "secret_key")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty (unset it instead)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        log_format = value.lower()
        if log_format not in ("text", "json"):
            raise ValueError("must be text or json")
        return log_format

    @property
    def rows_side_by_side(self) -> int:
        """Attempts one worker process runs at once (its row slots, ingest.pipeline): every
        thread of a threads pool; one under the other pools, whose concurrency is processes
        or greenlets that each run a message of their own."""
        return self.worker_concurrency if self.worker_pool == "threads" else 1

    @field_validator("worker_pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        if value not in ("threads", "prefork", "solo", "gevent"):
            raise ValueError("must be threads, prefork, solo or gevent")
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        var = self.var_dir.resolve()
        # frozen model: defaults derived from var_dir are written once, here.
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{var / 'ingest.sqlite3'}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", f"sqla+sqlite:///{var / 'broker.sqlite3'}")
        if not self.storage_url:
            object.__setattr__(self, "storage_url", (var / "media").as_uri())
        if self.worker_heartbeat_file is None:
            object.__setattr__(self, "worker_heartbeat_file", var / "worker.heartbeat")
        database_schemes = _installed_database_schemes()
        _check_scheme("database_url", self.database_url, database_schemes)
        _check_scheme(
            "broker_url",
            self.broker_url,
            (*(f"sqla+{scheme}" for scheme in database_schemes), *_BROKER_SCHEMES),
        )
        _check_scheme("storage_url", self.storage_url, ("s3", "file"))
        if self.storage_url.startswith("s3:") and not urlsplit(self.storage_url).netloc:
            raise ValueError("INGEST_STORAGE_URL: s3:// URL must name a bucket")
        if self.lease_seconds <= self.task_time_limit:
            raise ValueError("INGEST_LEASE_SECONDS must be longer than INGEST_TASK_TIME_LIMIT")
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError(
                "INGEST_TASK_SOFT_TIME_LIMIT must be shorter than INGEST_TASK_TIME_LIMIT"
            )
        return self

    @property
    def uses_embedded_defaults(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_var_dir(self) -> None:
        """Create ``var/`` (and the local media root) for the embedded defaults."""
        self.var_dir.mkdir(parents=True, exist_ok=True)
        if self.storage_url.startswith("file:"):
            Path(urlsplit(self.storage_url).path).mkdir(parents=True, exist_ok=True)


def _with_psycopg(url: str, scheme: str) -> str:
    if url.startswith(f"{scheme}://"):
        return f"{scheme}+psycopg://" + url.removeprefix(f"{scheme}://")
    return url


def _installed_database_schemes() -> tuple[str, ...]:
    """The database schemes whose driver can be imported: an accepted URL must work."""
    return tuple(
        scheme
        for scheme, module in _DATABASE_DRIVERS.items()
        if importlib.util.find_spec(module) is not None
    )


def _check_scheme(field: str, url: str, allowed: tuple[str, ...]) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in allowed:
        driver = _DATABASE_DRIVERS.get(scheme.removeprefix("sqla+"))
        missing = driver is not None and importlib.util.find_spec(driver) is None
        why = f" ({driver} is not installed)" if missing else ""
        raise ValueError(
            f"INGEST_{field.upper()}: scheme {scheme or '(none)'!r} is not one of "
            + ", ".join(allowed)
            + why
        )


def hide_password(url: str) -> str:
    """``url`` fit for a message or a log line: its password, if any, replaced by ``***``.

    Also a ``password=`` query parameter (libpq and redis-py accept one).
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart (a bad port): show none of it
        return "(unparsable URL)"
    hidden = url
    if password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        hidden = hidden.replace(parts.netloc, f"{userinfo.partition(':')[0]}:***@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(key.lower() in _PASSWORD_PARAMETERS for key, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _PASSWORD_PARAMETERS else v) for k, v in pairs],
                safe="*",
            )
            hidden = hidden.replace(f"?{parts.query}", f"?{query}", 1)
    return hidden


_PASSWORD_PARAMETERS = frozenset({"password", "passwd"})


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse ``INGEST_*`` variables that are neither settings nor read elsewhere.

    A misspelt name would otherwise be ignored, and its setting silently left at its default.
    """
    fields = sorted(Settings.model_fields)
    problems = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if (
            not upper.startswith("INGEST_")
            or upper.removeprefix("INGEST_").lower() in Settings.model_fields
            or upper in NOT_SETTINGS_NAMES
            or upper.startswith(NOT_SETTINGS_PREFIXES)
        ):
            continue
        # Compared without the prefix, which every candidate shares and would make alike.
        close = difflib.get_close_matches(upper.removeprefix("INGEST_").lower(), fields, n=1)
        hint = f"did you mean INGEST_{close[0].upper()}?" if close else "no setting is named alike"
        problems.append(f"{name} is not a known variable ({hint})")
    if problems:
        raise ConfigError("configuration error: " + "; ".join(problems))


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, turning validation errors into one line."""
    check_environment(os.environ)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if location:
            problems.append(f"INGEST_{location.upper()}: {message}")
        else:
            problems.append(message)
    return "configuration error: " + "; ".join(problems)
