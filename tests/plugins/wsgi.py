"""A throwaway HTTP server on a free port, in a thread: for answers the sandbox never gives,
or a real app served to a client that needs a URL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from werkzeug.serving import make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


@contextmanager
def wsgi_server(app: Any) -> Iterator[str]:
    """Serve ``app`` (any WSGI app, a Flask app included); yield its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
