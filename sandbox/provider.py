"""The sandbox provider's state and rules, independent of HTTP: numbers, media, signed URLs,
the error-based throttle, faults and counters. Thread-safe (the server is threaded).

Rules copied from what the real provider documents (provider-media-constraints.md):

- signed download URLs carry ``ext`` (expiry, epoch seconds) and ``hash`` (HMAC of media id
  and expiry); they stop working after ``url_lifetime_seconds`` (default 300);
- every error response served for a phone number's media GETs is recorded; ``error_threshold``
  (20) of them within ``error_window_seconds`` (60 min) block that number's media GETs for
  ``block_seconds`` (30 min), answered 429 meanwhile. 429s served while blocked are recorded
  but do not count again (otherwise a blocked client could never get out);
- 360dialog's stricter rule on top: ``d360_lookup_error_threshold`` (5) failed lookups
  (``GET /d360/<media-id>``) within the window block that number's lookups, and only those,
  for ``d360_lookup_block_seconds`` (one hour).

The clock is ``time.time()`` plus an offset moved by :meth:`SandboxProvider.advance_clock`, so
tests check expiry and the throttle window without sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal
from urllib.parse import urlencode

from sandbox.samples import Blob, sample_for

SignatureCheck = Literal["ok", "bad", "expired", "unknown"]
ENDPOINTS = ("graph_lookup", "d360_lookup", "cdn_download", "d360_download")
LOOKASIDE = "https://lookaside.fbsbx.com"
ATTACHMENTS_PATH = "/whatsapp_business/attachments/"
UNKNOWN_NUMBER = "unknown"
D360_LOOKUP = "d360_lookup"


@dataclass
class SandboxConfig:
    url_lifetime_seconds: float = 300.0
    error_threshold: int = 20
    error_window_seconds: float = 3600.0
    block_seconds: float = 1800.0
    d360_lookup_error_threshold: int = 5
    d360_lookup_block_seconds: float = 3600.0
    latency_ms: float = 0.0
    bandwidth: int | None = None  # bytes per second of download bodies; None: unlimited
    graph_version: str = "v21.0"
    signing_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)


@dataclass
class Faults:
    """What to do wrong for one media id (or, as the global faults, for every other one)."""

    # Served in order, one per request, before the normal answer; 200 means "answer normally".
    lookup_statuses: list[int] = field(default_factory=list)
    download_statuses: list[int] = field(default_factory=list)
    redirects: int = 0  # hops before the download answers
    redirect_status: int = 308
    redirect_host: str | None = None  # the last hop goes to this host (same port)
    gzip: bool = False  # download body with Content-Encoding: gzip
    lookup_gzip: Literal["header", "sniff"] | None = None  # sniff: gzip without the header
    double_escape: bool = False  # 360 lookup: "https:\\/\\/..." (a literal backslash left)
    corrupt: bool = False  # flip one byte; the stated sha256 stays the original's
    truncate: int | None = None  # send this many bytes, declare the full length, hang up
    size_delta: int = 0  # the lookup states file_size + size_delta
    latency_ms: float | None = None
    bandwidth: int | None = None
    html_200: bool = False  # 200 text/html error page instead of the media

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Faults:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        return cls(**values)


@dataclass(frozen=True)
class Number:
    phone_number_id: str
    api_key: str
    provider: str = "cloud"


@dataclass(frozen=True)
class SandboxMedia:
    media_id: str
    phone_number_id: str
    media_type: str
    mime_type: str
    sha256: str  # hex
    sha256_b64: str
    file_size: int
    url: str  # signed and fresh when returned; for a 360dialog number, on lookaside

    def __repr__(self) -> str:
        return f"SandboxMedia({self.media_type}, {self.media_id}, {self.file_size} bytes)"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Item:
    media: SandboxMedia
    blob: Blob


@dataclass(frozen=True)
class ServedError:
    at: float
    phone_number_id: str
    endpoint: str
    media_id: str | None
    status: int
    while_blocked: bool


@dataclass(frozen=True)
class SeenRequest:
    endpoint: str
    media_id: str | None
    host: str
    had_credentials: bool


class SandboxProvider:
    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._lock = threading.RLock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._offset = 0.0
        self._numbers: dict[str, Number] = {}
        self._items: dict[str, _Item] = {}
        self._faults: dict[str, Faults] = {}
        self._global = Faults()
        self._sequence_pos: dict[tuple[str | None, str], int] = defaultdict(int)
        self._requests: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._seen: list[SeenRequest] = []
        self._errors: list[ServedError] = []
        self._blocked_until: dict[str, float] = {}
        self._d360_lookups_blocked_until: dict[str, float] = {}

    # --- control ----------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._reset_state()

    def now(self) -> float:
        return time.time() + self._offset

    def advance_clock(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds

    def add_number(self, phone_number_id: str, api_key: str, provider: str = "cloud") -> Number:
        if not phone_number_id or not api_key:
            raise ValueError("phone_number_id and api_key are required")
        if provider not in ("cloud", "360dialog"):
            raise ValueError("provider must be cloud or 360dialog")
        number = Number(phone_number_id, api_key, provider)
        with self._lock:
            self._numbers[phone_number_id] = number
        return number

    def add_media(
        self,
        phone_number_id: str,
        media_type: str,
        *,
        base_url: str,
        size: int | None = None,
        mime_type: str | None = None,
    ) -> SandboxMedia:
        with self._lock:
            number = self._numbers.get(phone_number_id)
        if number is None:
            raise ValueError(f"unknown phone_number_id {phone_number_id!r}")
        if size is not None and size < 0:
            raise ValueError("size must be positive")
        sample = sample_for(media_type, mime_type)
        media_id = str(10**15 + secrets.randbelow(9 * 10**15))
        blob = Blob.build(sample, size, seed=int(media_id))
        digest = bytes.fromhex(blob.sha256)
        media = SandboxMedia(
            media_id=media_id,
            phone_number_id=phone_number_id,
            media_type=media_type,
            mime_type=mime_type or sample.mime_type,
            sha256=blob.sha256,
            sha256_b64=base64.b64encode(digest).decode(),
            file_size=blob.size,
            url="",
        )
        with self._lock:
            self._items[media_id] = _Item(media, blob)
        root = LOOKASIDE if number.provider == "360dialog" else base_url.rstrip("/")
        return _replace_url(media, root + self.signed_path(media_id))

    def set_faults(self, media_id: str | None = None, **values: Any) -> Faults:
        faults = Faults.from_dict(values)
        with self._lock:
            if media_id is None:
                self._global = faults
            else:
                self._faults[media_id] = faults
            for key in [k for k in self._sequence_pos if k[0] == media_id]:
                del self._sequence_pos[key]
        return faults

    # --- what the routes ask ----------------------------------------------------------

    def signed_path(self, media_id: str) -> str:
        expiry = int(self.now() + self.config.url_lifetime_seconds)
        query = urlencode(
            {
                "mid": media_id,
                "source": "getMedia",
                "ext": str(expiry),
                "hash": self._signature(media_id, expiry),
            }
        )
        return f"{ATTACHMENTS_PATH}?{query}"

    def _signature(self, media_id: str, expiry: int) -> str:
        mac = hmac.new(self.config.signing_key, f"{media_id}:{expiry}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def check_signature(self, media_id: str, ext: str, signature: str) -> SignatureCheck:
        if media_id not in self._items:
            return "unknown"
        if not ext.isdigit():
            return "bad"
        if not hmac.compare_digest(self._signature(media_id, int(ext)), signature):
            return "bad"
        return "expired" if self.now() > int(ext) else "ok"

    def number_for_key(self, api_key: str | None, media_id: str | None = None) -> Number | None:
        """The number ``api_key`` authenticates. One key may serve several numbers (a Meta
        system-user token reaches every number of its business): then the one that owns
        ``media_id``, if it is among them, else the first."""
        if not api_key:
            return None
        with self._lock:
            matching = [
                number
                for number in self._numbers.values()
                if hmac.compare_digest(number.api_key, api_key)
            ]
            found = self._items.get(media_id) if media_id else None
        if found is not None:
            for number in matching:
                if number.phone_number_id == found.media.phone_number_id:
                    return number
        return matching[0] if matching else None

    def item(self, media_id: str) -> tuple[SandboxMedia, Blob] | None:
        with self._lock:
            found = self._items.get(media_id)
        return (found.media, found.blob) if found else None

    def faults_for(self, media_id: str | None) -> Faults:
        with self._lock:
            if media_id is not None and media_id in self._faults:
                return self._faults[media_id]
            return self._global

    def next_status(self, media_id: str | None, kind: Literal["lookup", "download"]) -> int:
        """The next status of the fault sequence for this media (200 once it is used up)."""
        with self._lock:
            scoped = media_id if media_id is not None and media_id in self._faults else None
            faults = self._faults[scoped] if scoped is not None else self._global
            sequence = faults.lookup_statuses if kind == "lookup" else faults.download_statuses
            position = self._sequence_pos[(scoped, kind)]
            if position >= len(sequence):
                return 200
            self._sequence_pos[(scoped, kind)] = position + 1
            return sequence[position]

    def blocked_for(self, phone_number_id: str, endpoint: str | None = None) -> float | None:
        """Seconds left of the block on this number's calls to ``endpoint``, or None.

        Every media GET is under the number's block; 360dialog lookups also under their own.
        """
        with self._lock:
            until = [self._blocked_until.get(phone_number_id, 0.0)]
            if endpoint == D360_LOOKUP:
                until.append(self._d360_lookups_blocked_until.get(phone_number_id, 0.0))
        left = max(until) - self.now()
        return left if left > 0 else None

    def record_request(
        self, endpoint: str, media_id: str | None, host: str, had_credentials: bool
    ) -> None:
        with self._lock:
            self._requests[endpoint][media_id or ""] += 1
            self._seen.append(SeenRequest(endpoint, media_id, host, had_credentials))

    def record_error(
        self, phone_number_id: str, endpoint: str, media_id: str | None, status: int
    ) -> None:
        with self._lock:
            now = self.now()
            blocked = self.blocked_for(phone_number_id, endpoint) is not None
            self._errors.append(
                ServedError(now, phone_number_id, endpoint, media_id, status, blocked)
            )
            if blocked or phone_number_id == UNKNOWN_NUMBER:
                return
            since = now - self.config.error_window_seconds
            recent = [
                e
                for e in self._errors
                if e.phone_number_id == phone_number_id and not e.while_blocked and e.at > since
            ]
            if len(recent) >= self.config.error_threshold:
                self._blocked_until[phone_number_id] = now + self.config.block_seconds
            failed_lookups = [e for e in recent if e.endpoint == D360_LOOKUP]
            if len(failed_lookups) >= self.config.d360_lookup_error_threshold:
                self._d360_lookups_blocked_until[phone_number_id] = (
                    now + self.config.d360_lookup_block_seconds
                )

    # --- counters ---------------------------------------------------------------------

    def errors_served(self, phone_number_id: str | None = None) -> list[ServedError]:
        with self._lock:
            return [
                e
                for e in self._errors
                if phone_number_id is None or e.phone_number_id == phone_number_id
            ]

    def max_errors_in_window(self, phone_number_id: str) -> int:
        """Most errors (that count) in any throttle window: the budget test's measure."""
        times = [e.at for e in self.errors_served(phone_number_id) if not e.while_blocked]
        best, start = 0, 0
        for end, at in enumerate(times):
            while at - times[start] >= self.config.error_window_seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    def requests(self, endpoint: str, media_id: str | None = None) -> int:
        with self._lock:
            counts = self._requests.get(endpoint, {})
            if media_id is None:
                return sum(counts.values())
            return counts.get(media_id, 0)

    def seen(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            phones = sorted({e.phone_number_id for e in self._errors})
            return {
                "requests": {k: dict(v) for k, v in self._requests.items()},
                "errors": {
                    p: sum(1 for e in self._errors if e.phone_number_id == p) for p in phones
                },
                "max_errors_in_window": {p: self.max_errors_in_window(p) for p in phones},
                "errors_served": [asdict(e) for e in self._errors],
                "blocked_until": dict(self._blocked_until),
                "d360_lookups_blocked_until": dict(self._d360_lookups_blocked_until),
                "seen": [asdict(s) for s in self._seen],
                "media": len(self._items),
                "numbers": len(self._numbers),
            }


def _replace_url(media: SandboxMedia, url: str) -> SandboxMedia:
    values = asdict(media)
    values["url"] = url
    return SandboxMedia(**values)
