"""The demo's requests to the service, sent again when a kept-alive connection was reset.

A server closes an idle kept-alive connection on its own schedule (gunicorn after its
``keepalive`` seconds, 2 by default); a request written to such a connection as it closes
meets a reset, or the end of the stream, before any answer. Every request the demo makes may
be repeated: reads, and webhooks (the service records a message once however often it
arrives, as it must for a provider that retries).
"""

from __future__ import annotations

import httpx
import tenacity

# No answer came back: what httpx raises for a reset or a closed stream while waiting for it.
RESET_BEFORE_ANSWER = (httpx.ReadError, httpx.RemoteProtocolError)
ATTEMPTS = 3

# Built once and shared: a Retrying keeps its per-call state thread-local.
resend_on_reset = tenacity.Retrying(
    retry=tenacity.retry_if_exception_type(RESET_BEFORE_ANSWER),
    stop=tenacity.stop_after_attempt(ATTEMPTS),
    reraise=True,
)
