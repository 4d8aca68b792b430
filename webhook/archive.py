"""The archive API over HTTP: base64 lookup, metadata, raw bytes, and the OpenAPI document.

The rules (who sees what, which error wins) live in :mod:`ingest.archive`; this module reads
the request, streams bodies and sets headers. Bodies are streamed from storage in bounded
chunks, so a 100 MB document never sits in the web process's memory.

Before a token is looked up, the client's failed authentications are checked
(:class:`ingest.rate_limit.AuthFailureLimiter`, keyed by ``request.remote_addr``): a client
that has spent them is answered 429 without touching the database, and a token that turns
out not to exist spends one. ``remote_addr`` is the peer of the TCP connection; behind a
reverse proxy that is the proxy, so the operator must make the proxy's forwarded-for header
count (werkzeug's ``ProxyFix`` with the number of proxies in front). ``X-Forwarded-For`` is
never trusted by default: any client can write one.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import BinaryIO

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.blueprints import BlueprintSetupState

from ingest import archive, metrics, removal
from ingest.archive import ArchiveError, MediaRecord
from ingest.db import DATABASE_DOWN, READ_ONLY_OPTION
from ingest.models import utcnow
from ingest.rate_limit import Allowance, AuthFailureLimiter, RateLimiter, TokenLimits
from ingest.services import Services
from ingest.storage import StorageError
from webhook import openapi
from webhook.app import AUTH_FAILURES
from webhook.errors import error_response, json_response

log = logging.getLogger(__name__)

bp = Blueprint("archive", __name__)

API_PREFIX = "/api/chat/"
LIMITER = "ingest.rate_limiter"
TOKEN_LIMITS = "ingest.token_limits"  # noqa: S105 - an extension name, not a secret
RAW_CHUNK_BYTES = 256 * 1024
# Outages of the database or the store are usually brief (a failover, a pool refilled).
RETRY_AFTER = {"Retry-After": "5"}
# A redirect hands the caller a presigned URL of our own store: short-lived, never cached.
PRESIGN_SECONDS = 60
# Stored objects never change (written once, by sha256), but access can be revoked (a token
# deleted, an instance disconnected): caches may keep them a while, privately.
CACHE_CONTROL = "private, max-age=3600"
# Lookups only read: SQLite then begins DEFERRED instead of IMMEDIATE (see ingest.db).
READ_ONLY: dict[str, object] = {READ_ONLY_OPTION: True}


@bp.record_once
def _build_limiter(state: BlueprintSetupState) -> None:
    services: Services = state.app.extensions["ingest"]
    state.app.extensions[LIMITER] = RateLimiter.from_parts(
        services.settings.api_rate_limit,
        redis=services.redis,
        prefix=services.settings.redis_prefix,
        sessions=services.sessions,
    )
    state.app.extensions[TOKEN_LIMITS] = TokenLimits(services.sessions)


@bp.before_request
def _rate_limit() -> Response | None:
    if not request.path.startswith(API_PREFIX):
        return None
    limiter: RateLimiter = current_app.extensions[LIMITER]
    token = _token()
    if token is None or not _parameters_present():
        # Answered 400/401 without touching the database, and charged to nobody: the
        # headers describe the deployment's limit, untouched.
        g.rate_limit = limiter.unmetered()
        return None
    key = archive.token_key(token)
    tokens: TokenLimits = current_app.extensions[TOKEN_LIMITS]
    if not tokens.known(key):
        # A token this process has not seen: it may be a guess, so the client's failures
        # are asked first and the lookup is paid only while it has some left.
        failures: AuthFailureLimiter = current_app.extensions[AUTH_FAILURES]
        refusal = failures.refusal(request.remote_addr)
        if refusal is not None:
            g.rate_limit = refusal
            return _too_many(archive.TOO_MANY_FAILURES, refusal)
        found = tokens.lookup(key)
        if found is False:
            g.rate_limit = failures.fail(request.remote_addr)
            # The parameters are present, so the seed's next check, the token's, answers.
            return error_response(401, archive.INVALID_TOKEN)
        if found is None:
            # The database cannot say: the lookup that follows answers 503, and counting it
            # would only open a window per unknown token.
            g.rate_limit = limiter.unmetered()
            return None
    decision = limiter.hit(key, tokens.limit_of(key))
    g.rate_limit = decision
    if not decision.allowed:
        return _too_many(archive.TOO_MANY_REQUESTS, decision)
    return None


def _parameters_present() -> bool:
    """The seed's first check (400 without the database) passes: only then is a token
    looked up or counted."""
    try:
        archive.require_parameters(
            (request.view_args or {}).get("instance"), request.args.get("messageId")
        )
    except ArchiveError:
        return False
    return True


def _too_many(message: str, decision: Allowance) -> Response:
    return error_response(429, message, {"Retry-After": str(decision.retry_after)})


@bp.after_request
def _annotate(response: Response) -> Response:
    decision: Allowance | None = g.get("rate_limit")
    if decision is not None:
        response.headers["X-RateLimit-Limit"] = str(decision.limit)
        response.headers["X-RateLimit-Remaining"] = str(decision.remaining)
        response.headers["X-RateLimit-Reset"] = str(decision.reset)
    if request.path.startswith(API_PREFIX):
        # Answers depend on who asks: a shared cache must key on the credentials.
        response.vary.update(("token", "Authorization"))
        route = (request.endpoint or "unknown").rpartition(".")[2]
        metrics.API_REQUESTS.labels(route=route, status=str(response.status_code)).inc()
    return response


# --- routes ------------------------------------------------------------------------------


@bp.get("/api/chat/base64")
@bp.get("/api/chat/base64/")
@bp.get("/api/chat/base64/<instance>")
def base64_media(instance: str | None = None) -> Response:
    services: Services = current_app.extensions["ingest"]
    try:
        record = archive.require_available(_find(services, instance))
        name, message_id = record.instance, record.message_id
        archive.check_base64_size(
            record, services.settings.base64_max_bytes, archive.raw_media_path(name, message_id)
        )
    except ArchiveError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    tag = archive.etag(record, "b64")
    if tag is not None and request.if_none_match.contains(tag):
        return _not_modified(services, record, tag)
    envelope = archive.base64_envelope(record)
    assert record.size is not None
    opened = _open(services, record)
    if isinstance(opened, Response):
        return opened
    stack, stream = opened
    size = record.size

    def parts() -> Iterator[bytes]:
        yield envelope.prefix
        yield from _logged(archive.b64_chunks(stream, size), record)
        yield envelope.suffix

    response = Response(
        _StreamedBody(stack, parts()), mimetype="application/json", direct_passthrough=True
    )
    response.content_length = envelope.content_length
    _cacheable(response, tag)
    return response


@bp.get("/api/chat/find-message")
@bp.get("/api/chat/find-message/")
@bp.get("/api/chat/find-message/<instance>")
def find_message(instance: str | None = None) -> Response:
    services: Services = current_app.extensions["ingest"]
    try:
        record = _find(services, instance)
    except ArchiveError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    response = json_response(archive.metadata(record))
    # The state changes until the row is terminal: always ask again.
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/api/chat/media")
@bp.get("/api/chat/media/")
@bp.get("/api/chat/media/<instance>")
def raw_media(instance: str | None = None) -> Response:
    services: Services = current_app.extensions["ingest"]
    try:
        record = archive.require_available(_find(services, instance))
    except ArchiveError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    assert record.size is not None and record.storage_key is not None
    size = record.size
    tag = archive.etag(record, "raw")
    if tag is not None and request.if_none_match.contains(tag):
        return _not_modified(services, record, tag)
    extension = mimetypes.guess_extension(record.mime_type.split(";", 1)[0].strip())
    filename = archive.download_filename(record, extension)

    if request.args.get("redirect") in ("1", "true"):
        redirect = _presigned(services, record, filename)
        if redirect is not None:
            return redirect

    start, length, status = 0, size, 200
    header = request.headers.get("Range")
    ranges = archive.parse_byte_ranges(header) if header is not None else None
    if ranges is not None and _if_range_holds(tag):
        satisfiable = [b for b in (archive.range_bounds(r, size) for r in ranges) if b]
        if not satisfiable:
            response = error_response(416, "Requested range not satisfiable")
            response.headers["Content-Range"] = f"bytes */{size}"
            return response
        # Several ranges are answered with the whole object, as RFC 9110 allows.
        if len(ranges) == 1:
            start, stop = satisfiable[0]
            length, status = stop - start, 206

    opened = _open(services, record, start=start, length=length)
    if isinstance(opened, Response):
        return opened
    stack, stream = opened
    response = Response(
        _StreamedBody(stack, _logged(_raw_chunks(stream, length), record)),
        status=status,
        mimetype=None,
        content_type=record.mime_type,
        direct_passthrough=True,
    )
    response.content_length = length
    response.headers["Accept-Ranges"] = "bytes"
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
    response.headers["Content-Disposition"] = archive.content_disposition(filename)
    response.headers["X-Content-Type-Options"] = "nosniff"
    _cacheable(response, tag)
    return response


@bp.delete("/api/chat/media")
@bp.delete("/api/chat/media/")
@bp.delete("/api/chat/media/<instance>")
def erase_media(instance: str | None = None) -> Response:
    """A right-to-erasure request: the object is deleted, the row kept as ``erased`` with
    who and when (see :mod:`ingest.removal`). Idempotent; account tokens only."""
    services: Services = current_app.extensions["ingest"]
    token = _token()
    try:
        with _token_checked(token), services.sessions() as session:
            instance_id, message_id, who = archive.authorize_erasure(
                session, token, instance, request.args.get("messageId")
            )
        erasure = removal.erase(
            services.sessions,
            services.storage,
            instance_id=instance_id,
            message_id=message_id,
            by=who,
            now=utcnow(),
        )
    except ArchiveError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except removal.NotFound:
        return error_response(404, archive.NO_MEDIA)
    except DATABASE_DOWN:
        log.warning("erasure: database unavailable")
        return error_response(503, "Service unavailable", RETRY_AFTER)
    except StorageError as exc:
        # The row is erased (nothing is served from now on); the object is deleted when the
        # caller repeats the request.
        return _storage_unavailable(exc)
    response = json_response(
        {
            "success": True,
            "message": archive.ERASED,
            "message_id": erasure.message_id,
            "erased_at": erasure.erased_at.isoformat(),
            "erased_by": erasure.erased_by,
        }
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/openapi.json")
def openapi_document() -> Response:
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    document = app.extensions.get("ingest.openapi")
    if document is None:
        document = app.extensions["ingest.openapi"] = openapi.build_document()
    return jsonify(document)


# --- pieces ------------------------------------------------------------------------------


def _token() -> str | None:
    return archive.presented_token(
        request.headers.get("token"), request.headers.get("Authorization")
    )


def _read_only(services: Services) -> dict[str, object]:
    """A lookup is one SELECT: on PostgreSQL it needs no transaction around it (saves the
    BEGIN and ROLLBACK round trips); SQLite keeps its transaction, deferred (READ_ONLY)."""
    if services.engine.dialect.name == "postgresql":
        return {**READ_ONLY, "isolation_level": "AUTOCOMMIT"}
    return READ_ONLY


def _find(services: Services, instance: str | None) -> MediaRecord:
    token = _token()
    message_id = request.args.get("messageId")
    # Parameter errors come first and need no database.
    archive.require_parameters(instance, message_id)
    with _token_checked(token), services.sessions() as session:
        # Lookups only read: on SQLite this asks db.py for a deferred BEGIN, so readers
        # do not queue behind each other for the write lock (see _read_only).
        session.connection(execution_options=_read_only(services))
        return archive.find_record(session, token, instance, message_id)


@contextmanager
def _token_checked(token: str | None) -> Iterator[None]:
    """Around a lookup of ``token``: an unknown token counts as a failed authentication, and
    an unreachable database is the 503 every archive route answers."""
    try:
        yield
    except archive.TokenNotFound:
        # Known to this process once, revoked since: a failure like any other, and the
        # next request with it is gated and looked up again.
        assert token is not None
        tokens: TokenLimits = current_app.extensions[TOKEN_LIMITS]
        tokens.forget(archive.token_key(token))
        failures: AuthFailureLimiter = current_app.extensions[AUTH_FAILURES]
        failures.fail(request.remote_addr)
        raise
    except DATABASE_DOWN:
        log.warning("archive api: database unavailable")
        raise ArchiveError(503, "Service unavailable", RETRY_AFTER) from None


def _open(
    services: Services, record: MediaRecord, *, start: int = 0, length: int | None = None
) -> tuple[ExitStack, BinaryIO] | Response:
    """Open the object before the answer starts, so a missing object is still a clean 404."""
    assert record.storage_key is not None
    stack = ExitStack()
    try:
        stream = stack.enter_context(
            services.storage.open(record.storage_key, start=start, length=length)
        )
    except FileNotFoundError:
        stack.close()
        return _object_missing(record)
    except StorageError as exc:
        stack.close()
        return _storage_unavailable(exc)
    return stack, stream


def _object_missing(record: MediaRecord) -> Response:
    log.error(
        "archive api: row stored but object missing instance=%s message=%s",
        record.instance,
        record.message_id,
    )
    return error_response(404, archive.NO_MEDIA)


def _storage_unavailable(exc: StorageError) -> Response:
    log.warning("archive api: storage unavailable (%s)", type(exc).__name__)
    return error_response(503, "Storage unavailable", RETRY_AFTER)


def _raw_chunks(stream: BinaryIO, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        data = stream.read(min(RAW_CHUNK_BYTES, remaining))
        if not data:
            raise StorageError(f"stored object ended {remaining} bytes early")
        remaining -= len(data)
        yield data


def _logged(chunks: Iterator[bytes], record: MediaRecord) -> Iterator[bytes]:
    """Headers are gone once streaming starts: a failure can only cut the connection, and
    the log must say why (the declared Content-Length tells the client it was cut)."""
    try:
        yield from chunks
    except StorageError as exc:
        log.error(
            "archive api: stream broken instance=%s message=%s: %s",
            record.instance,
            record.message_id,
            type(exc).__name__,
        )
        raise


class _StreamedBody:
    """A WSGI body that closes the storage stream when the server is done with it, even if
    the body was never iterated (a HEAD request, a client gone before the first byte)."""

    def __init__(self, stack: ExitStack, parts: Iterator[bytes]) -> None:
        self._stack = stack
        self._parts = parts

    def __iter__(self) -> Iterator[bytes]:
        return self._parts

    def close(self) -> None:
        try:
            close = getattr(self._parts, "close", None)
            if close is not None:
                close()
        finally:
            self._stack.close()


def _cacheable(response: Response, tag: str | None) -> None:
    response.headers["Cache-Control"] = CACHE_CONTROL
    if tag is not None:
        response.set_etag(tag)


def _not_modified(services: Services, record: MediaRecord, tag: str) -> Response:
    """304, if the object is still there: the ETag comes from the row, and a row whose object
    is gone has no media to be current with (404, as a plain GET would answer)."""
    assert record.storage_key is not None
    try:
        # A head, not an open: the body is never sent, so no stream is worth opening.
        services.storage.head(record.storage_key)
    except FileNotFoundError:
        return _object_missing(record)
    except StorageError as exc:
        return _storage_unavailable(exc)
    response = Response(status=304)
    _cacheable(response, tag)
    return response


def _if_range_holds(tag: str | None) -> bool:
    """``If-Range`` with our strong ETag keeps the range; a date or another tag drops it."""
    if "If-Range" not in request.headers:
        return True
    if_range = request.if_range
    return tag is not None and if_range.etag == tag and if_range.date is None


def _presigned(services: Services, record: MediaRecord, filename: str) -> Response | None:
    assert record.storage_key is not None
    try:
        url = services.storage.presign(
            record.storage_key,
            expires_in=PRESIGN_SECONDS,
            filename=filename,
            content_type=record.mime_type,
        )
    except StorageError:
        return None  # serve the bytes ourselves instead
    if url is None:
        return None
    response = Response(status=302)
    response.headers["Location"] = url
    response.headers["Cache-Control"] = "no-store"
    return response
