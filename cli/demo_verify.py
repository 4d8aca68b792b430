"""What ``ingest demo`` sent and what became of it, and reading each stored item back through
the archive API (find-message, then base64) to compare it byte for byte with the provider's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from cli.demo_http import resend_on_reset
from ingest.models import MediaState
from sandbox.provider import SandboxMedia
from sandbox.registration import DemoRegistration

# The archive API reads run while the rows are still arriving; the service's web processes
# (make run: 2 x 4 threads) are the limit, not this.
VERIFY_CONCURRENCY = 8
POLL_SECONDS = 0.25


@dataclass
class Sent:
    media: SandboxMedia
    wamid: str
    sent_at: datetime
    status: int | None = None
    state: str = MediaState.PENDING
    reason: str | None = None
    stored_at: datetime | None = None
    verified: bool | None = None
    problem: str | None = None


def verify_item(
    http: httpx.Client,
    service_url: str,
    instance: str,
    item: Sent,
    throttled: Callable[[], None] = lambda: None,
) -> None:
    """Read one stored item back (find-message, then base64) and compare it byte for byte.
    ``throttled`` is called for every 429 the archive API answers."""
    params = {"messageId": item.wamid}
    found = _get_respecting_limit(
        http, f"{service_url}/api/chat/find-message/{instance}", throttled, params=params
    )
    if found.status_code != 200:
        item.verified, item.problem = False, f"find-message answered {found.status_code}"
        return
    response = _get_respecting_limit(
        http, f"{service_url}/api/chat/base64/{instance}", throttled, params=params
    )
    if response.status_code != 200:
        item.verified, item.problem = False, f"base64 answered {response.status_code}"
        return
    body = response.json()
    try:
        data = base64.b64decode(body["base64"], validate=True)
    except (KeyError, binascii.Error):
        item.verified, item.problem = False, "base64 body unreadable"
        return
    digest = hashlib.sha256(data).hexdigest()
    if digest != item.media.sha256 or len(data) != item.media.file_size:
        item.verified, item.problem = False, "bytes differ from the provider's"
    elif found.json().get("sha256") != item.media.sha256:
        item.verified, item.problem = False, "find-message states another sha256"
    elif body.get("media_type") != item.media.media_type:
        item.verified, item.problem = False, f"media_type {body.get('media_type')!r}"
    else:
        item.verified = True


def _get_respecting_limit(
    http: httpx.Client, url: str, throttled: Callable[[], None], **kwargs: Any
) -> httpx.Response:
    """Should the service still limit the demo's token, wait when it says so."""
    for _ in range(10):
        response = resend_on_reset(http.get, url, **kwargs)
        if response.status_code != 429:
            return response
        throttled()
        time.sleep(min(float(response.headers.get("Retry-After", "1")), 60.0))
    return response


class Verifier:
    """Verifies items as they are handed over (rows just stored), several at a time."""

    def __init__(
        self, service_url: str, reg: DemoRegistration, concurrency: int = VERIFY_CONCURRENCY
    ) -> None:
        self._service_url = service_url
        self._instance = reg.instance
        self._http = httpx.Client(
            timeout=60.0,
            headers={"token": reg.token},
            limits=httpx.Limits(max_connections=concurrency),
        )
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="demo-verify")
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self.throttled = 0  # 429 answers: the token's limit was in the way

    def _count_throttled(self) -> None:
        with self._lock:
            self.throttled += 1

    def submit(self, item: Sent) -> None:
        self._futures.append(
            self._pool.submit(
                verify_item,
                self._http,
                self._service_url,
                self._instance,
                item,
                self._count_throttled,
            )
        )

    def done(self) -> int:
        return sum(1 for future in self._futures if future.done())

    def wait(self, progress: Callable[[int], None] = lambda _: None) -> None:
        """Until every item handed over is verified; ``progress(done)`` now and then."""
        while self.done() < len(self._futures):
            progress(self.done())
            time.sleep(POLL_SECONDS)
        progress(self.done())
        for future in self._futures:
            future.result()  # a bug in verify_item is raised here, not swallowed

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
