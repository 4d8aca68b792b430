"""Provider API keys and Meta app secrets at rest: encrypted with Fernet keys from outside the
database, decrypted only where they are used (the worker's claim, the receiver's signature
check, ``ingest sandbox send``).

Keys, in order of preference:

- ``INGEST_SECRET_KEY``: comma-separated Fernet keys (``ingest secrets generate-key``). The
  first encrypts; every one decrypts (``MultiFernet``), which is what makes rotation possible
  without a window where some secret cannot be read.
- Embedded default (SQLite) without that variable: one key generated on first use into
  ``secret.key`` (mode 0600) in the directory of the SQLite file, which is ``INGEST_VAR_DIR``
  with the default database. Beside the file rather than under each process's own var_dir:
  every process that opens the database finds the same key whatever its other settings, and
  so does code that holds only a database URL (a migration).
- A server database (PostgreSQL) without ``INGEST_SECRET_KEY``: refused. Each machine would
  generate a key of its own, and a secret stored by one could not be read by the others.

Rotation: put a new key first in ``INGEST_SECRET_KEY`` and keep the old one after it (with the
embedded default, the old one is the content of ``secret.key``), restart the processes, run
``ingest secrets rotate`` (every stored secret is re-encrypted with the first key), then drop
the old key from the variable.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from ingest.settings import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

KEY_VARIABLE = "INGEST_SECRET_KEY"
KEY_FILE_NAME = "secret.key"


class SecretKeyError(ConfigError):
    """No usable key for the stored secrets; the message is one line naming INGEST_SECRET_KEY."""


class SecretBox:
    """Encrypts with the first key, decrypts with any of them."""

    def __init__(self, keys: Sequence[bytes | str], *, source: str = KEY_VARIABLE) -> None:
        if not keys:
            raise SecretKeyError(f"{source}: no key given")
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                # Never the key itself in the message: it is a secret even when malformed.
                raise SecretKeyError(
                    f"{source}: key {position} is not a Fernet key (32 url-safe base64-encoded "
                    "bytes; `ingest secrets generate-key` prints one)"
                ) from None
        self._fernet = MultiFernet(fernets)
        self.source = source
        self.key_count = len(fernets)

    def __repr__(self) -> str:
        return f"SecretBox({self.source}, {self.key_count} key(s))"

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeEncodeError):
            raise SecretKeyError(self._unreadable()) from None

    def rotate(self, token: str) -> str:
        """The same secret, encrypted again with the first key."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeEncodeError):
            raise SecretKeyError(self._unreadable()) from None

    def _unreadable(self) -> str:
        return (
            f"a stored secret cannot be decrypted with the key(s) of {self.source}: it was "
            f"encrypted with another key; put that key after the first in {KEY_VARIABLE} "
            "(then `ingest secrets rotate`)"
        )


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def key_file_for(database_url: str, var_dir: Path) -> Path | None:
    """Where the generated key lives for this database, or None for a server database."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return None
    if url.database in (None, "", ":memory:") or str(url.database).startswith("file:"):
        return var_dir.resolve() / KEY_FILE_NAME
    return Path(url.database).resolve().parent / KEY_FILE_NAME


def secret_box(settings: Settings) -> SecretBox:
    """The box of a process's settings (cached per process: a claim asks for it each time)."""
    return secret_box_for(settings.database_url, settings.secret_key, settings.var_dir)


def environment_secret_box(database_url: str) -> SecretBox:
    """The box for ``database_url`` with this process's environment (``INGEST_SECRET_KEY``):
    for code that holds a database connection but no settings (a migration, or the
    receiver's instance cache when it is given no box)."""
    settings = load_settings()
    return secret_box_for(database_url, settings.secret_key, settings.var_dir)


@functools.lru_cache(maxsize=32)
def secret_box_for(
    database_url: str, secret_key: SecretStr | str | None, var_dir: Path
) -> SecretBox:
    """Cached per process: the worker asks on every claim, and finding the key file costs
    file system calls."""
    configured = secret_key.get_secret_value() if isinstance(secret_key, SecretStr) else secret_key
    key_file = key_file_for(database_url, var_dir) if not configured else None
    return _cached_box(configured or None, key_file)


@functools.lru_cache(maxsize=16)
def _cached_box(configured: str | None, key_file: Path | None) -> SecretBox:
    if configured:
        return SecretBox([part.strip() for part in configured.split(",") if part.strip()])
    if key_file is None:
        raise SecretKeyError(
            f"{KEY_VARIABLE} is not set: with a server database every process must share one "
            "key to store or read provider secrets (`ingest secrets generate-key` prints one)"
        )
    return SecretBox([_load_or_create(key_file)], source=str(key_file))


def _load_or_create(path: Path) -> bytes:
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a private temporary file, then linked into place: a process that
    # starts at the same moment either sees no file or the whole key, and link() fails if
    # another process won, in which case its key is the one used.
    fd, temporary = tempfile.mkstemp(prefix=".secret-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(Fernet.generate_key() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _read_key(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    log.warning(
        "generated the key that encrypts provider secrets at %s: keep it with the database "
        "(without it the stored API keys and app secrets cannot be read), or set %s",
        path,
        KEY_VARIABLE,
    )
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    if not key:
        raise SecretKeyError(f"{path} is empty: restore the key, or set {KEY_VARIABLE}")
    return key
