"""The sandbox provider over HTTP: Graph and 360dialog lookups, CDN downloads, control API.

Routes (``<v>`` is the configured Graph version, ``v21.0``)::

    GET  /<v>/<media_id>                          Graph lookup (Authorization: Bearer)
    GET  /d360/<media_id>                         360dialog lookup (D360-API-KEY)
    GET  /whatsapp_business/attachments/?mid&ext&hash        Cloud CDN download
    GET  /d360/whatsapp_business/attachments/?mid&ext&hash   360dialog download
    POST /_sandbox/numbers | /_sandbox/media | /_sandbox/faults | /_sandbox/reset
    POST /_sandbox/clock {"advance": seconds}
    GET  /_sandbox/stats

The Cloud CDN route also accepts ``D360-API-KEY`` so one webhook URL from ``/_sandbox/media``
works whichever provider flavour the service is configured with (the service's 360dialog
client fetches only ``lookaside.fbsbx.com`` URLs, rewritten onto its base, and that base's
own attachment path: it resolves such a URL's media id instead).

Every URL handed out (webhook URLs, lookup answers, redirect hops) is in the form the service
sends its credential to: ``/whatsapp_business/attachments/?mid=<media id>&...``, at the root
(Cloud CDN, on the Graph stand-in's origin), under ``/d360`` (360dialog's rewrite), or on
``lookaside.fbsbx.com`` (a 360dialog number's webhook URL, as 360dialog delivers it).
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, jsonify, request

from sandbox.provider import (
    LOOKASIDE,
    UNKNOWN_NUMBER,
    Faults,
    Number,
    SandboxConfig,
    SandboxProvider,
)
from sandbox.samples import Blob

STREAM_CHUNK = 64 * 1024


def create_sandbox_app(
    config: SandboxConfig | None = None, *, provider: SandboxProvider | None = None
) -> Flask:
    """The sandbox app; its state is ``app.extensions["sandbox"]`` (a :class:`SandboxProvider`)."""
    provider = provider or SandboxProvider(config)
    config = provider.config
    app = Flask("sandbox")
    app.extensions["sandbox"] = provider

    def pause(faults: Faults) -> None:
        latency = faults.latency_ms if faults.latency_ms is not None else config.latency_ms
        if latency > 0:
            time.sleep(latency / 1000.0)

    def error(
        status: int, phone: str, endpoint: str, media_id: str | None, message: str
    ) -> Response:
        provider.record_error(phone, endpoint, media_id, status)
        response = jsonify(
            {"error": {"message": message, "type": "OAuthException", "code": status}}
        )
        response.status_code = status
        if status == 429:
            left = provider.blocked_for(phone, endpoint)
            response.headers["Retry-After"] = str(int(left) + 1 if left else 60)
        return response

    def owner(media_id: str | None, number: Number | None) -> str:
        if number is not None:
            return number.phone_number_id
        found = provider.item(media_id) if media_id else None
        return found[0].phone_number_id if found else UNKNOWN_NUMBER

    def credential(kind: str) -> str | None:
        if kind == "bearer":
            header = request.headers.get("Authorization", "")
            return header[7:].strip() if header.lower().startswith("bearer ") else None
        return request.headers.get("D360-API-KEY") or None

    def lookup(media_id: str, endpoint: str, kind: str) -> Response:
        faults = provider.faults_for(media_id)
        pause(faults)
        key = credential(kind)
        number = provider.number_for_key(key, media_id)
        provider.record_request(endpoint, media_id, request.host, key is not None)
        phone = owner(media_id, number)
        if number is None:
            return error(401, phone, endpoint, media_id, "Invalid OAuth access token")
        if provider.blocked_for(phone, endpoint) is not None:
            return error(429, phone, endpoint, media_id, "Too many errors: media GETs blocked")
        status = provider.next_status(media_id, "lookup")
        if status != 200:
            return error(status, phone, endpoint, media_id, f"Sandbox fault {status}")
        found = provider.item(media_id)
        if found is None or found[0].phone_number_id != number.phone_number_id:
            return error(404, phone, endpoint, media_id, "Unsupported get request")
        media, _ = found
        path = provider.signed_path(media_id)
        body: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "mime_type": media.mime_type,
            "sha256": media.sha256,
            "id": media_id,
        }
        if endpoint == "graph_lookup":
            body["url"] = request.host_url.rstrip("/") + path
            body["file_size"] = media.file_size + faults.size_delta
            text = json.dumps(body)
        else:
            body["url"] = LOOKASIDE + path
            body["file_size"] = str(media.file_size + faults.size_delta)
            text = json.dumps(body).replace("/", "\\/")  # 360dialog escapes every slash
            if faults.double_escape:
                text = text.replace('"https:\\/\\/', '"https:\\\\/\\\\/')
        raw = text.encode()
        response = Response(content_type="application/json")
        if faults.lookup_gzip:
            raw = gzip.compress(raw)
            if faults.lookup_gzip == "header":
                response.headers["Content-Encoding"] = "gzip"
        response.set_data(raw)
        return response

    @app.get(f"/{config.graph_version}/<media_id>")
    def graph_lookup(media_id: str) -> Response:
        return lookup(media_id, "graph_lookup", "bearer")

    @app.get("/d360/<media_id>")
    def d360_lookup(media_id: str) -> Response:
        return lookup(media_id, "d360_lookup", "d360")

    def download(endpoint: str, kinds: tuple[str, ...]) -> Response:
        media_id = request.args.get("mid", "")
        faults = provider.faults_for(media_id)
        pause(faults)
        key = next((k for k in (credential(kind) for kind in kinds) if k), None)
        number = provider.number_for_key(key, media_id)
        provider.record_request(endpoint, media_id or None, request.host, key is not None)
        phone = owner(media_id, number)
        if number is None:
            return error(401, phone, endpoint, media_id, "Authentication required")
        if provider.blocked_for(phone) is not None:
            return error(429, phone, endpoint, media_id, "Too many errors: media GETs blocked")
        hop = int(request.args.get("hop", "0") or 0)
        if hop < faults.redirects:
            return redirect_hop(hop, faults)
        status = provider.next_status(media_id, "download")
        if status != 200:
            return error(status, phone, endpoint, media_id, f"Sandbox fault {status}")
        check = provider.check_signature(
            media_id, request.args.get("ext", ""), request.args.get("hash", "")
        )
        if check in ("unknown", "expired"):
            return error(404, phone, endpoint, media_id, "URL signature expired")
        if check == "bad":
            return error(403, phone, endpoint, media_id, "URL signature mismatch")
        found = provider.item(media_id)
        assert found is not None
        media, blob = found
        if media.phone_number_id != number.phone_number_id:
            return error(403, phone, endpoint, media_id, "Not your media")
        if faults.html_200:
            return Response(
                "<!DOCTYPE html><html><body>Sorry, something went wrong.</body></html>",
                content_type="text/html; charset=utf-8",
            )
        return media_response(media.mime_type, blob, faults)

    def redirect_hop(hop: int, faults: Faults) -> Response:
        query = urlencode({**request.args.to_dict(), "hop": str(hop + 1)})
        location = f"{request.path}?{query}"
        if hop + 1 == faults.redirects and faults.redirect_host:
            port = request.host.rsplit(":", 1)[1] if ":" in request.host else ""
            netloc = f"{faults.redirect_host}:{port}" if port else faults.redirect_host
            location = f"{request.scheme}://{netloc}{location}"
        response = Response(status=faults.redirect_status)
        response.headers["Location"] = location
        return response

    def media_response(mime_type: str, blob: Blob, faults: Faults) -> Response:
        bandwidth = faults.bandwidth if faults.bandwidth is not None else config.bandwidth
        limit = blob.size if faults.truncate is None else min(faults.truncate, blob.size)

        def body() -> Iterator[bytes]:
            offset = 0
            flip_at = blob.size // 2
            for chunk in _rechunk(blob.chunks(), STREAM_CHUNK):
                if offset >= limit:
                    return
                piece = chunk[: limit - offset]
                if faults.corrupt and offset <= flip_at < offset + len(piece):
                    i = flip_at - offset
                    piece = piece[:i] + bytes([piece[i] ^ 0xFF]) + piece[i + 1 :]
                offset += len(piece)
                if bandwidth:
                    time.sleep(len(piece) / bandwidth)
                yield piece

        def gzipped() -> Iterator[bytes]:
            compressor = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
            for piece in body():
                out = compressor.compress(piece)
                if out:
                    yield out
            yield compressor.flush()

        response = Response(gzipped() if faults.gzip else body(), content_type=mime_type)
        if faults.gzip:
            response.headers["Content-Encoding"] = "gzip"
        else:
            response.headers["Content-Length"] = str(blob.size)
        if faults.truncate is not None:
            response.headers["Connection"] = "close"
        return response

    @app.get("/whatsapp_business/attachments/")
    def cdn_download() -> Response:
        return download("cdn_download", ("bearer", "d360"))

    @app.get("/d360/whatsapp_business/attachments/")
    def d360_download() -> Response:
        return download("d360_download", ("d360",))

    # --- control ------------------------------------------------------------------------

    def payload() -> dict[str, Any]:
        data = request.get_json(silent=True)
        return data if isinstance(data, dict) else {}

    def bad_request(message: str) -> Response:
        response = jsonify({"error": message})
        response.status_code = 400
        return response

    @app.post("/_sandbox/numbers")
    def control_numbers() -> Response:
        data = payload()
        try:
            number = provider.add_number(
                str(data.get("phone_number_id", "")),
                str(data.get("api_key", "")),
                str(data.get("provider", "cloud")),
            )
        except ValueError as exc:
            return bad_request(str(exc))
        return jsonify({"phone_number_id": number.phone_number_id, "provider": number.provider})

    @app.post("/_sandbox/media")
    def control_media() -> Response:
        data = payload()
        try:
            size = data.get("size")
            media = provider.add_media(
                str(data.get("phone_number_id", "")),
                str(data.get("media_type", "")),
                base_url=request.host_url,
                size=int(size) if size is not None else None,
                mime_type=data.get("mime_type"),
            )
        except (TypeError, ValueError) as exc:
            return bad_request(str(exc))
        return jsonify(media.as_dict())

    @app.post("/_sandbox/faults")
    def control_faults() -> Response:
        data = payload()
        media_id = data.pop("media_id", None)
        try:
            faults = provider.set_faults(media_id, **data)
        except (TypeError, ValueError) as exc:
            return bad_request(str(exc))
        return jsonify({"media_id": media_id, "faults": faults.__dict__})

    @app.post("/_sandbox/reset")
    def control_reset() -> Response:
        provider.reset()
        return jsonify({"reset": True})

    @app.post("/_sandbox/clock")
    def control_clock() -> Response:
        provider.advance_clock(float(payload().get("advance", 0)))
        return jsonify({"now": provider.now()})

    @app.get("/_sandbox/stats")
    def control_stats() -> Response:
        return jsonify(provider.stats())

    return app


def _rechunk(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    for chunk in chunks:
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]
