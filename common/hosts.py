"""The allowed-hosts policy: one check, in front of every route (otari/asgi.py).

Django checks the Host header only when something calls `request.get_host()` (its
CommonMiddleware and CSRF do), so the generation routes, which run without middleware,
never checked it, while the admin and `/health` answered a refused Host with Django's HTML
400 and a logged traceback. This middleware decides for every request, before Django, from
DJANGO_ALLOWED_HOSTS (`settings.OTARI_ALLOWED_HOSTS`; Django's own check is off, see
otari/settings.py):

- health probes (`/health`, `/health/liveness`, `/health/readiness`, also under `/v1/`
  and `/api/v1/`) answer any well-formed Host: load balancers and Kubernetes probes call
  them by IP address; a Host that is no host name at all is refused there too;
- the generation and management APIs (`/v1/...`, `/api/v1/...`) answer any Host when
  OTARI_API_ANY_HOST is set (keys, not cookies, authenticate them); by default they follow
  the list like the rest;
- every other request needs a Host in the list, or gets a 400 and one warning line in the
  log (no traceback): JSON in the shape of the API it called, except on the console
  (`/admin/`), whose users are browsers and get a short HTML page.

The JSON refusal is `{"detail": ...}` unless the `error_body` hook, given by otari/asgi.py
(llm_proxy.errors.error_body_for_path), writes it in a generation API's own shape: this
package imports no app.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from common.exceptions import BadRequest, GatewayError

# Named for the project, not for this module's path: operators filter the log on it.
logger = logging.getLogger("common.hosts")

# The body of an error for a request path, in that API's shape; None for `{"detail": ...}`.
ErrorBodyHook = Callable[[GatewayError, str], dict | None]

HEALTH_PATHS = re.compile(r"^/(?:(?:api/)?v1/)?health(?:/liveness|/readiness)?/?$")
_API_PATHS = re.compile(r"^/(?:api/)?v1/")
_CONSOLE_PATHS = re.compile(r"^/admin(?:/|$)")


class HostNotAllowed(BadRequest):
    code = "host_not_allowed"
    message = "This gateway does not answer to the Host header sent (see DJANGO_ALLOWED_HOSTS)"


# Static: nothing of the request is echoed.
_CONSOLE_REFUSAL = (
    "<!doctype html><html lang=en><head><meta charset=utf-8><title>Bad Request (400)</title>"
    f"</head><body><h1>Bad Request (400)</h1><p>{HostNotAllowed.message}.</p></body></html>"
).encode()


def _host_of(scope: dict) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"host":
            return value.decode("latin-1")
    server = scope.get("server")
    return f"{server[0]}:{server[1]}" if server else ""


def host_allowed(host: str) -> bool:
    return _host_allowed(host, tuple(settings.OTARI_ALLOWED_HOSTS))


# Parsing and matching a Host costs about 10 µs, on every request; the Hosts a gateway
# sees are few (bounded all the same: the header is the client's text).
@functools.lru_cache(maxsize=256)
def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    domain = _domain(host)
    return bool(domain) and validate_host(domain, allowed)


@functools.lru_cache(maxsize=256)
def _domain(host: str) -> str:
    """The host name of a Host header; "" when it is not one (Django's syntax check)."""
    return split_domain_port(host)[0]


class AllowedHostsMiddleware:
    """ASGI middleware applying the policy above."""

    def __init__(self, app: Callable, *, error_body: ErrorBodyHook | None = None) -> None:
        self.app = app
        self.error_body = error_body

    def _refusal(self, path: str) -> tuple[bytes, bytes]:
        """The 400's content type and body, in the shape of the API the request called."""
        exc = HostNotAllowed()
        if _CONSOLE_PATHS.match(path):
            return b"text/html; charset=utf-8", _CONSOLE_REFUSAL
        body = self.error_body(exc, path) if self.error_body else None
        payload = body if body is not None else {"detail": exc.message}
        return b"application/json", json.dumps(payload).encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, host = scope["path"], _host_of(scope)
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if (
            host_allowed(host)
            or (HEALTH_PATHS.match(path) and _domain(host))
            or (settings.OTARI_API_ANY_HOST and _API_PATHS.match(path))
        ):
            await self.app(scope, receive, send)
            return
        # %r escapes control characters: the Host header is the client's text.
        logger.warning(
            "Refused a request for host %r: not in DJANGO_ALLOWED_HOSTS (%s %s)",
            host,
            scope["method"],
            path,
        )
        content_type, body = self._refusal(path)
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
