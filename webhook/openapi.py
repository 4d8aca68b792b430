"""The OpenAPI 3.1 document of every route the web process serves.

Written by hand rather than generated from the views: the contract (the seed's bodies and
messages) is the fixed point, and the tests hold the live app to this document (every rule
of the URL map is described here, and a schemathesis run finds no answer outside it).
"""

from __future__ import annotations

from typing import Any

from ingest import archive
from ingest.models import MediaState, MediaType

JSON = "application/json"

ARCHIVE_SECURITY: list[dict[str, list[str]]] = [
    {"token": []},
    {"bearer": []},
    {"authorization": []},
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return _json(_ref("Error"), description, **extra)


def _retry_after(description: str) -> dict[str, Any]:
    return {
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "string"},
            }
        },
        **_error(description),
    }


# On every archive answer, errors and 304s included. A request that presents no token (or
# misses a parameter) is charged to nobody: its answer describes the deployment's limit,
# untouched. A token that does not exist, and the 429 of a client that spent its failed
# authentications, describe the client's failed-authentication window instead.
RATE_LIMIT_HEADERS: dict[str, Any] = {
    "X-RateLimit-Limit": {
        "description": "Requests allowed per window for this token (its own limit, else "
        "the deployment's). On the 401 of a token that does not exist, and on a 429 for "
        "failed authentications: the failed authentications allowed to this client address "
        "(or, when the whole deployment is refusing, to every address together).",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests (or failed authentications) left in the window, this one counted.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Reset": {
        "description": "When the moving window next frees a request (its oldest counted "
        "request leaves it), in Unix epoch seconds; on a 429, when to come back.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    },
}


def _with_rate_limit_headers(responses: dict[str, Any]) -> dict[str, Any]:
    return {
        status: {**answer, "headers": {**answer.get("headers", {}), **RATE_LIMIT_HEADERS}}
        for status, answer in responses.items()
    }


_INSTANCE_PARAM = {
    "name": "instance",
    "in": "path",
    "required": True,
    "description": "Instance name.",
    "schema": {"type": "string"},
}
_MESSAGE_ID_PARAM = {
    "name": "messageId",
    "in": "query",
    "required": True,
    "description": "ID of the message that contains the media (wamid).",
    # Empty (or blank) is answered 400 `messageId query parameter is required`.
    "schema": {"type": "string", "minLength": 1},
}
_VALIDATORS = [
    {
        "name": "If-None-Match",
        "in": "header",
        "required": False,
        "description": "ETag of a copy the caller holds; answered 304 if it still matches.",
        "schema": {"type": "string"},
    }
]


def _archive_errors(*, with_413: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "400": _error(
            f"`{archive.INSTANCE_REQUIRED}` or `{archive.MESSAGE_ID_REQUIRED}` (missing or empty)."
        ),
        "401": _error(f"`{archive.INVALID_TOKEN}`: missing, unknown, or not valid here."),
        "404": _error(f"`{archive.INSTANCE_NOT_FOUND}` or `{archive.NO_MEDIA}`."),
        "429": _retry_after(
            f"`{archive.TOO_MANY_REQUESTS}`: over the token's rate limit (a moving window; "
            "100 a minute unless the deployment or the token says otherwise). Or "
            f"`{archive.TOO_MANY_FAILURES}`: this client address has spent its failed "
            "authentications (20 a minute unless configured), or the deployment its own (600 "
            "a minute), so a token it has not used here before is refused without being "
            "looked up until the window frees."
        ),
        "503": _retry_after(
            f"`{archive.NOT_CONNECTED}` (for media not yet stored: stored media is served "
            "whatever the connection state), or the database or storage is unavailable "
            "(those two with `Retry-After`)."
        ),
    }
    if with_413:
        responses["413"] = _error("Over the base64 size ceiling; the message names the raw route.")
    return responses


def _archive_operation(
    operation_id: str, summary: str, ok: dict[str, Any], *, instance: bool = True, **more: Any
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [_MESSAGE_ID_PARAM]
    # Offered only where the view answers 304: find-message is no-store, without an ETag.
    if "304" in ok:
        parameters.extend(_VALIDATORS)
    if instance:
        parameters.insert(0, _INSTANCE_PARAM)
    responses = {**ok, **_archive_errors(with_413=operation_id.startswith("base64"))}
    responses.update(more)
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["archive"],
            "security": ARCHIVE_SECURITY,
            "parameters": parameters,
            "responses": _with_rate_limit_headers(responses),
        }
    }


def _cached_headers() -> dict[str, Any]:
    return {
        "ETag": {"description": "Derived from the stored sha256.", "schema": {"type": "string"}},
        "Cache-Control": {"schema": {"type": "string"}},
    }


def _not_modified() -> dict[str, Any]:
    return {"304": {"description": "The caller's copy is current.", "headers": _cached_headers()}}


def _archive_paths() -> dict[str, Any]:
    base64_ok = {
        "200": _json(_ref("Base64Media"), "The media, base64 encoded.", headers=_cached_headers()),
        **_not_modified(),
    }
    find_ok = {"200": _json(_ref("MessageMetadata"), "The row, in any state.")}
    binary = {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    media_headers = {
        **_cached_headers(),
        "Content-Disposition": {"schema": {"type": "string"}},
        "Accept-Ranges": {"schema": {"type": "string"}},
    }
    media_ok = {
        "200": {"description": "The raw bytes.", "headers": media_headers, "content": binary},
        "206": {
            "description": "One byte range (single `Range` requests only).",
            "headers": {**media_headers, "Content-Range": {"schema": {"type": "string"}}},
            "content": binary,
        },
        "302": {
            "description": "With `redirect=1` on S3: a presigned URL valid for 60 seconds. "
            "The URL names the object store's endpoint, bucket and key, and carries the "
            "signing access key id (`X-Amz-Credential`): callers learn them.",
            "headers": {"Location": {"schema": {"type": "string"}}},
        },
        **_not_modified(),
        "416": _error(
            "No range asked for can be satisfied: each starts at or past the end, or is a "
            "suffix of no bytes (`bytes=-0`).",
            headers={"Content-Range": {"schema": {"type": "string"}}},
        ),
    }
    media_params = [
        {
            "name": "Range",
            "in": "header",
            "required": False,
            "description": "One byte range, e.g. `bytes=0-1023`.",
            "schema": {"type": "string"},
        },
        {
            "name": "redirect",
            "in": "query",
            "required": False,
            "description": "`1` asks for a redirect to a presigned URL when the store is S3. "
            "The bytes then come straight from the store, but the URL shows the caller the "
            "store's endpoint, bucket and object key and the access key id that signed it "
            "(never the secret key); serve the bytes through this API where that matters.",
            "schema": {"type": "string", "enum": ["0", "1"]},
        },
    ]
    routes = {
        "base64": (
            "base64",
            "Media as base64 (the seed contract).",
            base64_ok,
        ),
        "find-message": ("findMessage", "Metadata and state of a message's media.", find_ok),
        "media": ("media", "The raw bytes, with Range and conditional requests.", media_ok),
    }
    paths: dict[str, Any] = {}
    missing = {"400": _error(f"`{archive.INSTANCE_REQUIRED}`.")}

    def without_instance(operation_id: str) -> dict[str, Any]:
        return {
            "operationId": operation_id,
            # Nothing is looked up or counted without an instance name: never a 429.
            "summary": "Without an instance name: always 400.",
            "tags": ["archive"],
            "security": ARCHIVE_SECURITY,
            "parameters": [{**_MESSAGE_ID_PARAM, "required": False}],
            "responses": _with_rate_limit_headers(missing),
        }

    for segment, (operation_id, summary, ok) in routes.items():
        full = _archive_operation(operation_id, summary, ok)
        if segment == "media":
            full["get"]["parameters"] = full["get"]["parameters"] + media_params
            full["delete"] = _erase_operation()
        paths[f"/api/chat/{segment}/{{instance}}"] = full
        for suffix, name in (("", "NoInstance"), ("/", "NoInstanceSlash")):
            paths[f"/api/chat/{segment}{suffix}"] = {
                "get": without_instance(f"{operation_id}{name}")
            }
            if segment == "media":
                paths[f"/api/chat/{segment}{suffix}"]["delete"] = without_instance(f"erase{name}")
    return paths


def _erase_operation() -> dict[str, Any]:
    errors = _archive_errors()
    errors["403"] = _error(f"`{archive.ACCOUNT_TOKEN_REQUIRED}`: an instance token was used.")
    errors["503"] = _retry_after(
        "The database or storage is unavailable. When storage failed, the row is already "
        "erased (nothing is served); repeat the request to delete the object."
    )
    return {
        "operationId": "erase",
        "summary": "Erase a message's media (right to erasure): the object is deleted, the "
        "row kept as `erased` with who and when. Idempotent: a repeat answers 200 with the "
        "first erasure's time. A later webhook for the message does not bring it back.",
        "tags": ["archive"],
        "security": ARCHIVE_SECURITY,
        "parameters": [_INSTANCE_PARAM, _MESSAGE_ID_PARAM],
        "responses": _with_rate_limit_headers(
            {"200": _json(_ref("Erased"), "Erased (now or before)."), **errors}
        ),
    }


def _webhook_body() -> dict[str, Any]:
    """What the receiver requires of a body (ingest.events); everything else is ignored."""
    text = {"type": "string"}
    media = {
        "type": "object",
        "description": "`id` is required unless the message carries `errors`.",
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]{1,64}$"},
            "mime_type": {**text, "maxLength": 255},
            "sha256": text,
            "url": {**text, "maxLength": 8192},
            "caption": text,
            "filename": text,
            "file_size": {"type": ["integer", "string"]},
            "voice": {"type": "boolean"},
            "animated": {"type": "boolean"},
        },
    }
    message = {
        "type": "object",
        "required": ["type"],
        "description": "A media message (`type` one of image, video, audio, document, "
        "sticker) also requires `id` (the wamid) and the object named by its type.",
        "properties": {
            "type": text,
            "id": {**text, "maxLength": 255},
            "from": {**text, "maxLength": 64},
            "timestamp": {"type": ["string", "number"]},
            "errors": {"type": "array", "items": {"type": "object"}},
            **{kind.value: media for kind in MediaType},
        },
    }
    value = {
        "type": "object",
        "properties": {
            "metadata": {
                "type": "object",
                "properties": {"phone_number_id": {"type": ["string", "integer"]}},
            },
            "messages": {"type": "array", "items": message},
            "statuses": {"type": "array"},
            "contacts": {"type": "array", "items": {"type": "object"}},
            "errors": {"type": "array", "items": {"type": "object"}},
        },
    }
    change = {
        "type": "object",
        "description": "`value` is required when `field` is `messages` or absent.",
        "properties": {"field": text, "value": value},
    }
    return {
        "type": "object",
        "required": ["entry"],
        "properties": {
            "object": {"const": "whatsapp_business_account"},
            "entry": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"changes": {"type": "array", "items": change}},
                },
            },
        },
    }


def _webhook_paths() -> dict[str, Any]:
    handshake_params = [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in ("hub.mode", "hub.verify_token", "hub.challenge")
    ]
    handshake = {
        "tags": ["webhook"],
        "summary": "Meta's verification handshake: echoes `hub.challenge` as plain text.",
        "parameters": handshake_params,
        "responses": {
            "200": {
                "description": "The challenge, echoed.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "403": _error("Not `subscribe`, or the verify token does not match."),
            "503": _retry_after("The database is unavailable."),
        },
    }
    receive = {
        "tags": ["webhook"],
        "summary": "Inbound messages. Answered only after the media rows are committed.",
        "description": "A WhatsApp Business webhook (Meta's Cloud API envelope; 360dialog "
        "forwards the same). Bounds, checked before any lookup by phone number id: at most "
        "`INGEST_WEBHOOK_MAX_BYTES` (4 MiB) of body, whatever its framing (`Content-Length` "
        "or chunked; a chunked body is read up to one byte past the limit, never cut), and "
        "at most `INGEST_WEBHOOK_MAX_ITEMS` (1000) distinct phone number ids and, separately, "
        "media items; over either, 413. The signature covers every byte received. A media "
        "`id` is a provider media id (digits); a media `url` that is not a CDN attachment URL "
        "(`https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=<id>&...`, or "
        "360dialog's rewrite of it) is ignored and the media id resolved instead.",
        "parameters": [
            {
                "name": "X-Hub-Signature-256",
                "in": "header",
                "required": False,
                "description": "`sha256=<hex HMAC of the raw body>`, where the instance has "
                "an app secret.",
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": _webhook_body()}},
        },
        "responses": {
            "200": _json(_ref("WebhookAccepted"), "Accepted (media rows committed)."),
            "400": _error(
                "Not JSON, not a WhatsApp webhook body (a required field missing or of the "
                "wrong type, a media id that is not digits), or a body that ended early."
            ),
            "401": _error("Missing or forged signature."),
            "404": _error("Unknown phone number id (or instance)."),
            "411": _error("Neither `Content-Length` nor a chunked body the server delimits."),
            "413": _error(
                "Body over `INGEST_WEBHOOK_MAX_BYTES`, or naming more than "
                "`INGEST_WEBHOOK_MAX_ITEMS` phone number ids or media items."
            ),
            "415": _error("Not `application/json`."),
            "503": _retry_after("The database is unavailable: the provider retries."),
        },
    }
    instance_param = {**_INSTANCE_PARAM, "description": "Per-instance URL (360dialog style)."}
    return {
        "/webhook": {
            "get": {**handshake, "operationId": "webhookVerify"},
            "post": {**receive, "operationId": "webhookReceive"},
        },
        "/webhook/{instance}": {
            "get": {
                **handshake,
                "operationId": "webhookVerifyInstance",
                "parameters": [instance_param, *handshake_params],
            },
            "post": {
                **receive,
                "operationId": "webhookReceiveInstance",
                "parameters": [instance_param, *receive["parameters"]],
            },
        },
    }


def _operations_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "tags": ["operations"],
                "summary": "Liveness: the process answers.",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ok"}},
                        },
                        "Alive.",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "tags": ["operations"],
                "summary": "Readiness: database, storage, broker and Redis answer.",
                "description": "Unauthenticated, for load balancers and orchestrators: anyone "
                "who reaches the port learns which dependencies answer (and the error type of "
                "those that do not). Keep the port off the public internet, or let the "
                "reverse proxy refuse this path from outside.",
                "responses": {
                    "200": _json(_ref("Readiness"), "Every dependency answers."),
                    "503": _json(_ref("Readiness"), "At least one dependency does not."),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics (every process of the machine).",
                "description": "Open to anyone who reaches the port unless "
                "`INGEST_METRICS_TOKEN` is set; then `Authorization: Bearer <token>` is "
                "required. The metrics hold no secret, but show traffic, failure rates and "
                "queue depths.",
                # Either no credentials (no token configured) or the bearer token.
                "security": [{}, {"bearer": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _error(
                        "`INGEST_METRICS_TOKEN` is set and the request does not carry it as "
                        "`Authorization: Bearer <token>`.",
                        headers={
                            "WWW-Authenticate": {
                                "required": True,
                                "schema": {"type": "string"},
                            }
                        },
                    ),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["operations"],
                "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
            }
        },
    }


def _schemas() -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    nullable_int = {"type": ["integer", "null"]}
    timestamp = {"type": ["string", "null"], "format": "date-time"}
    media_type = {"type": "string", "enum": [str(t) for t in MediaType]}
    return {
        "Error": {
            "type": "object",
            "required": ["success", "error"],
            "properties": {
                "success": {"const": False},
                "error": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string"}},
                },
            },
        },
        "Base64Media": {
            "type": "object",
            "required": ["success", "message", "message_id", "mime_type", "media_type", "base64"],
            "additionalProperties": False,
            "properties": {
                "success": {"const": True},
                "message": {"const": archive.BASE64_OK},
                "message_id": {"type": "string"},
                "mime_type": {"type": "string"},
                "media_type": media_type,
                "base64": {"type": "string", "contentEncoding": "base64"},
            },
        },
        "MessageMetadata": {
            "type": "object",
            "required": ["success", "message", "message_id", "state", "media_type"],
            "properties": {
                "success": {"const": True},
                "message": {"const": archive.FOUND},
                "instance": {"type": "string"},
                "message_id": {"type": "string"},
                "state": {"type": "string", "enum": [str(s) for s in MediaState]},
                "available": {"type": "boolean"},
                "failure_reason": nullable_string,
                "media_type": media_type,
                "mime_type": {"type": "string"},
                "declared_mime": nullable_string,
                "sniffed_mime": nullable_string,
                "size": nullable_int,
                "declared_size": nullable_int,
                "sha256": nullable_string,
                "declared_sha256": nullable_string,
                "filename": nullable_string,
                "caption": nullable_string,
                "sender": nullable_string,
                "voice": {"type": "boolean"},
                "animated": {"type": "boolean"},
                "over_send_limit": {"type": "boolean"},
                "message_timestamp": timestamp,
                "received_at": timestamp,
                "stored_at": timestamp,
                "expires_at": timestamp,
                "attempts": {"type": "integer"},
                "removed_at": timestamp,
                "removed_by": nullable_string,
            },
        },
        "Erased": {
            "type": "object",
            "required": ["success", "message", "message_id", "erased_at", "erased_by"],
            "additionalProperties": False,
            "properties": {
                "success": {"const": True},
                "message": {"const": archive.ERASED},
                "message_id": {"type": "string"},
                "erased_at": {"type": "string", "format": "date-time"},
                "erased_by": {"type": "string"},
            },
        },
        "WebhookAccepted": {
            "type": "object",
            "required": ["success", "message", "media", "new"],
            "properties": {
                "success": {"const": True},
                "message": {"const": "Webhook accepted"},
                "media": {"type": "integer", "minimum": 0},
                "new": {"type": "integer", "minimum": 0},
            },
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "checks": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    }


def build_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "WhatsApp media ingestion",
            "version": "0.1.0",
            "description": "Webhook receiver for WhatsApp Business media, and the archive "
            "API that serves the stored media back (`media-as-base64-api`). The archive API "
            "is rate limited per token over a moving window shared by every web process; "
            "every answer carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and "
            "`X-RateLimit-Reset` (Unix epoch seconds), a 429 also `Retry-After`. Failed "
            "authentications are limited per client address and for the whole deployment: "
            "a client that spent them gets 429 without its token being looked up. The client "
            "address is the TCP peer; behind a reverse proxy the operator must configure the "
            "proxy's forwarded-for handling, since `X-Forwarded-For` is not trusted by "
            "default.\n\n"
            "Exposure: `/healthz`, `/readyz`, `/openapi.json` and (unless "
            "`INGEST_METRICS_TOKEN` is set) `/metrics` answer anyone who reaches the port. "
            "The raw media route's `redirect=1` hands the caller a presigned URL that shows "
            "the object store's endpoint, bucket, key and signing access key id.",
        },
        "tags": [
            {"name": "archive", "description": "Stored media, per instance and message id."},
            {"name": "webhook", "description": "Provider deliveries (Meta, 360dialog)."},
            {"name": "operations", "description": "Health, readiness, metrics."},
        ],
        "paths": {**_webhook_paths(), **_archive_paths(), **_operations_paths()},
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "token"},
                "bearer": {"type": "http", "scheme": "bearer"},
                # The seed's "`token`: yes (or `Authorization`)": the same bare token there.
                "authorization": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "The bare token, as in the `token` header.",
                },
            },
        },
    }
