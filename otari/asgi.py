"""ASGI entry point: Channels' ProtocolTypeRouter in front of two Django HTTP handlers.

Generation routes (`/v1/chat/completions`, ...) go to a handler with no middleware.
Django's stock middleware (sessions, auth, CSRF, messages: what the admin needs) are
synchronous hooks, and under ASGI each one costs the request a round trip to a thread;
a gateway request needs none of them. Everything else (admin, management API, health)
goes through the full stack.

Production serves this with uvicorn (docs/PERFORMANCE.md has the measurements behind
that choice); `manage.py runserver` serves it with Daphne for development.
"""

import os

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.urls import re_path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")

# Django must be set up before anything imports models.
django_http = get_asgi_application()

from common.body_limit import BodyLimitMiddleware  # noqa: E402
from common.hosts import AllowedHostsMiddleware  # noqa: E402
from llm_proxy import ratelimit  # noqa: E402 - needs Django set up
from llm_proxy.errors import error_body_for_path, server_error_body  # noqa: E402
from otari import metrics  # noqa: E402
from otari.metrics import ObservabilityMiddleware  # noqa: E402
from otari.startup import Lifespan  # noqa: E402


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler with an empty middleware chain (see the module docstring)."""

    async def __call__(self, scope, receive, send) -> None:
        # Django runs each request in a ThreadSensitiveContext, i.e. on a new thread for
        # its synchronous parts (the request_started/finished signal receivers and
        # response.close). A generation request does its work on the event loop (the
        # hot path's SQL goes through common.pgpool), so it shares one long-lived thread
        # for those few synchronous calls instead of starting a thread per request.
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        # What BaseHandler.load_middleware builds for settings.MIDDLEWARE == [].
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = self._get_response_async if is_async else self._get_response
        self._middleware_chain = convert_exception_to_response(handler)


GENERATION_ROUTES = r"^(?:api/)?v1/(?:chat/completions|messages|responses|embeddings|models)"

ratelimit.warn_if_per_process()
metrics.warn_if_per_process()
metrics.warn_if_unguarded()

# Outermost: the worker's warm-up at startup (ASGI lifespan, otari/startup.py); then
# every request's log context (request id), metrics and access log line, and a JSON 500
# for an exception that escapes everything inside; then the allowed-hosts policy, for
# every route (common/hosts.py); then the body size limit, before Django reads a body
# (common/body_limit.py).
application = Lifespan(
    ObservabilityMiddleware(
        AllowedHostsMiddleware(
            BodyLimitMiddleware(
                ProtocolTypeRouter(
                    {
                        "http": URLRouter(
                            [
                                re_path(GENERATION_ROUTES, GatewayASGIHandler()),
                                re_path(r"", django_http),
                            ]
                        ),
                    }
                ),
                error_body=error_body_for_path,
            ),
            error_body=error_body_for_path,
        ),
        error_body=server_error_body,
    )
)
