"""The request body size limit, enforced before Django reads the body (otari/asgi.py).

Django's ASGI handler reads a request's whole body (into a temporary file, on disk past
FILE_UPLOAD_MAX_MEMORY_SIZE) before any view runs, and only then does `request.body`
compare the *declared* Content-Length with DATA_UPLOAD_MAX_MEMORY_SIZE. So a client could
make the gateway take in gigabytes before its 413, and a chunked body (no Content-Length)
was never limited at all: it reached `json.loads` whole, whatever its size.

This middleware answers 413 (OTARI_MAX_REQUEST_BYTES, settings.DATA_UPLOAD_MAX_MEMORY_SIZE):

- at once, without reading a byte of the body, when Content-Length is over the limit;
- as soon as the bytes received pass the limit, for a body without one (chunked): the
  application (Django) is stopped while it reads, and the rest is never read.

The ASGI server then closes the connection (the unread rest of the body makes it unusable).
The refusal is JSON in the shape of the API called (the `error_body` hook, given by
otari/asgi.py: llm_proxy.errors.error_body_for_path), `{"detail": ...}` elsewhere on the
APIs, a short HTML page on the console.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

from django.conf import settings

from common.exceptions import PayloadTooLarge
from common.hosts import ErrorBodyHook

logger = logging.getLogger("common.body_limit")

_CONSOLE_PATHS = re.compile(r"^/admin(?:/|$)")
_CONSOLE_REFUSAL = (
    "<!doctype html><html lang=en><head><meta charset=utf-8><title>Request too large (413)"
    f"</title></head><body><h1>Request too large (413)</h1><p>{PayloadTooLarge.message}."
    "</p></body></html>"
).encode()


class _BodyTooLarge(Exception):
    """Raised into the application from `receive` once the body passes the limit."""


def _declared_length(scope: dict) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the ASGI server refuses a malformed one before us
    return None


class BodyLimitMiddleware:
    """ASGI middleware applying the limit above."""

    def __init__(self, app: Callable, *, error_body: ErrorBodyHook | None = None) -> None:
        self.app = app
        self.error_body = error_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, send, declared)
            return

        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def watching_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if started:  # cannot happen: Django reads the body before it answers
                raise
            await self._refuse(scope, send, None)

    async def _refuse(self, scope: dict, send: Callable, declared: int | None) -> None:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        logger.warning(
            "Refused a request body over %d bytes (%s): %s %r",
            settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
            f"Content-Length {declared}" if declared is not None else "chunked",
            scope["method"],
            path,
        )
        if _CONSOLE_PATHS.match(path):
            content_type, body = b"text/html; charset=utf-8", _CONSOLE_REFUSAL
        else:
            exc = PayloadTooLarge()
            shaped = self.error_body(exc, path) if self.error_body else None
            payload = shaped if shaped is not None else {"detail": exc.message}
            content_type, body = b"application/json", json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is not read: the connection cannot serve another
                    # request.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
