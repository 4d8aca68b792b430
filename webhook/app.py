"""Flask application factory: the webhook receiver and the archive API over the core."""

from __future__ import annotations

import logging
from contextvars import Token

from flask import Flask, g, request
from flask.wrappers import Response
from werkzeug.exceptions import HTTPException

from ingest import logs
from ingest.queues import DownloadScheduler
from ingest.rate_limit import AuthFailureLimiter
from ingest.services import Services
from ingest.settings import Settings, load_settings
from webhook import errors, health, metrics

log = logging.getLogger(__name__)

WEB_PING_AFTER_IDLE_SECONDS = 5.0
# app.extensions key of the AuthFailureLimiter: one per app, for every credential it checks.
AUTH_FAILURES = "ingest.auth_failures"


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    scheduler: DownloadScheduler | None = None,
) -> Flask:
    if services is None:
        # A webhook that meets a connection the database dropped answers 503 and the
        # provider retries, so a round trip per request to pre-check every connection buys
        # little: only connections idle for a while are checked.
        services = Services.from_settings(
            settings or load_settings(), ping_after_idle=WEB_PING_AFTER_IDLE_SECONDS
        )
    if scheduler is None:
        from tasks.dispatch import CeleryScheduler

        scheduler = CeleryScheduler.from_settings(services.settings)

    app = Flask(__name__)
    if services.settings.web_forwarded_hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # The client address the failed-authentication limit counts by: the one the
        # operator's own proxies recorded, never more hops than they said (a client can
        # write any X-Forwarded-For it likes).
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=services.settings.web_forwarded_hops
        )
    # Bodies are read (and capped) by the receiver itself; Flask's own limit backs it up.
    app.config["MAX_CONTENT_LENGTH"] = services.settings.webhook_max_bytes
    app.extensions["ingest"] = services
    app.extensions["ingest.scheduler"] = scheduler
    # Failed authentications per client address and deployment-wide, in the same shared
    # storage as the API's rate limit (see ingest.rate_limit and webhook.archive).
    app.extensions[AUTH_FAILURES] = AuthFailureLimiter.from_parts(
        per_client=services.settings.auth_failure_rate_limit,
        overall=services.settings.auth_failure_global_rate_limit,
        redis=services.redis,
        prefix=services.settings.redis_prefix,
        sessions=services.sessions,
    )

    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    from webhook import archive, receiver

    app.register_blueprint(receiver.bp)
    app.register_blueprint(archive.bp)

    app.register_error_handler(HTTPException, errors.http_error)
    app.register_error_handler(Exception, errors.unexpected_error)
    _add_request_id(app)
    return app


REQUEST_ID_HEADER = "X-Request-Id"


def _add_request_id(app: Flask) -> None:
    """Every log line of a request carries its id (ingest.logs), echoed in the answer."""

    @app.before_request
    def _set_request_id() -> None:
        request_id = logs.request_id_from(request.headers.get(REQUEST_ID_HEADER))
        g.request_id = request_id
        g.request_id_token = logs.REQUEST_ID.set(request_id)

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @app.teardown_request
    def _clear_request_id(_exc: BaseException | None) -> None:
        token: Token[str | None] | None = g.pop("request_id_token", None)
        if token is not None:
            logs.REQUEST_ID.reset(token)
