"""ASGI entry point: the generation routes on a handler of their own, everything else on
Django's.

Generation routes (`/v1/chat/completions`, ...: llm_proxy/urls.py) are served by
`GenerationHandler`, which calls their views straight from ASGI. Django's handler would
run each of them through its middleware (sessions, auth, CSRF, messages: what the admin
needs, synchronous hooks that under ASGI cost a round trip to a thread each), and send
its `request_started` and `request_finished` signals, whose receivers are synchronous too
(two more thread hops per request; docs/PERFORMANCE.md has the profile). A gateway request
needs none of that. Everything else (admin, management API, health) goes through Django's
full stack.

Production serves this with uvicorn (docs/PERFORMANCE.md has the measurements behind
that choice); `manage.py runserver` serves it with Daphne for development.
"""

import asyncio
import io
import os

from asgiref.sync import sync_to_async
from channels.routing import ProtocolTypeRouter
from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import close_old_connections, connections
from django.db.backends.signals import connection_created
from django.urls import resolve, set_script_prefix
from django.utils.log import log_response

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")

# Django must be set up before anything imports models.
django_http = get_asgi_application()

from common.body_limit import BodyLimitMiddleware  # noqa: E402
from common.hosts import AllowedHostsMiddleware  # noqa: E402
from llm_proxy import ratelimit  # noqa: E402 - needs Django set up
from llm_proxy import urls as generation_urls  # noqa: E402
from llm_proxy.errors import error_body_for_path, server_error_body  # noqa: E402
from otari import metrics  # noqa: E402
from otari.metrics import ObservabilityMiddleware  # noqa: E402
from otari.startup import Lifespan  # noqa: E402

# Where the generation routes are mounted (otari/urls.py).
GENERATION_PREFIXES = ("/v1/", "/api/v1/")


class GenerationHandler(ASGIHandler):
    """The generation routes' views, called straight from ASGI; any other path goes to
    `fallback` (Django's own handler).

    What Django's handler does for a request, this does too, where a generation request
    needs it:
    - the request object is Django's own `ASGIRequest`, so the views see the same request;
    - a view's exception is answered by Django (handler404, handler500);
    - the view is cancelled when the client disconnects (the pipeline then refunds, or
      charges what was delivered: llm_proxy/pipeline/request.py, relay.py);
    - the response is sent as Django sends it, and an error response logged as Django
      logs it (django.request).
    Its signals' work is done only when there is some: while no ORM connection is open
    (the hot path on PostgreSQL uses none, common/pgpool.py) there is none to close, and
    its responses hold no resources for `response.close()` to release.
    """

    def __init__(self, fallback) -> None:
        super().__init__()
        self.fallback = fallback
        # path -> view, resolved through the URL configuration, so both agree.
        self.views = {
            prefix + str(pattern.pattern): convert_exception_to_response(
                resolve(prefix + str(pattern.pattern)).func
            )
            for prefix in GENERATION_PREFIXES
            for pattern in generation_urls.urlpatterns
        }

    def load_middleware(self, is_async: bool = False) -> None:
        # None: the views are called directly (see the class docstring).
        pass

    async def __call__(self, scope, receive, send) -> None:
        view = script_name = None
        if scope["type"] == "http":
            script_name = get_script_prefix(scope)
            path = scope["path"]
            view = self.views.get(path.removeprefix(script_name) if script_name else path)
        if view is None:
            await self.fallback(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client left before its request was complete
            return
        set_script_prefix(script_name)
        await _close_old_orm_connections()
        request, error_response = self.create_request(scope, io.BytesIO(body))
        if request is None:
            await self.send_response(error_response, send)
            return
        try:
            await self._respond(view, request, receive, send)
        finally:
            await _close_old_orm_connections()

    async def _respond(self, view, request, receive, send) -> None:
        """The view's response, sent; both cancelled if the client disconnects."""
        task = asyncio.current_task()
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            response = await view(request)
            if response.status_code >= 400:
                # Django's line for an error response (django.request), as its handler
                # writes it; on the event loop, as every other log line of the request.
                log_response(
                    "%s: %s",
                    response.reason_phrase,
                    request.path,
                    response=response,
                    request=request,
                )
            await self.send_response(response, send)
        except asyncio.CancelledError:
            if not disconnected:  # the server's cancellation, not the client's
                raise
            # The client left: the view saw the cancellation and closed its books.
            task.uncancel()
        finally:
            # Synchronous, so the watcher cannot cancel this task any more.
            watcher.cancel()


async def _read_body(receive) -> bytes | None:
    """The request's body (its size is capped by BodyLimitMiddleware, outside); None if
    the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# Whether an ORM connection may be open. Django keeps ORM connections per thread, and a
# request's synchronous ORM calls (sync_to_async) run on one shared thread, where its
# request_finished receiver closed them (close_old_connections: with CONN_MAX_AGE = 0, a
# pooled connection goes back to the pool). Set when a connection opens, on any thread;
# cleared by that thread's check when none is left open.
_orm_connection_open = False


def _orm_connection_opened(**kwargs) -> None:
    global _orm_connection_open
    _orm_connection_open = True


connection_created.connect(_orm_connection_opened, dispatch_uid="otari.asgi.orm_connection")


def _close_old_connections_sync() -> None:
    global _orm_connection_open
    close_old_connections()
    _orm_connection_open = any(
        conn.connection is not None for conn in connections.all(initialized_only=True)
    )


async def _close_old_orm_connections() -> None:
    """What Django's request_started and request_finished receivers do for the database
    (`close_old_connections`, on the thread of synchronous calls), done only while an ORM
    connection is open: the hot path on PostgreSQL opens none (common/pgpool.py), so it
    pays no thread hop."""
    if _orm_connection_open:
        await sync_to_async(_close_old_connections_sync)()


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
                ProtocolTypeRouter({"http": GenerationHandler(fallback=django_http)}),
                error_body=error_body_for_path,
            ),
            error_body=error_body_for_path,
        ),
        error_body=server_error_body,
    )
)
