"""Errors on the generation endpoints: provider failures, redaction, and rendering in the
wire shape of the API that was called (docs/SPEC.md §2).

OpenAI-style routes: `{"error": {"message", "type", "code", "param"}}`.
Anthropic route:     `{"type": "error", "error": {"type", "message"}}`.
Both official SDKs map these by HTTP status to their typed errors (AuthenticationError,
PermissionDeniedError, ...).
"""

from __future__ import annotations

import json
import re
from typing import Literal

from django.http import HttpRequest, HttpResponse
from django.views import defaults

from common.exceptions import GatewayError
from otari.logging import current as current_request

ErrorStyle = Literal["openai", "anthropic"]


class InternalError(GatewayError):
    """An error the gateway did not expect. The client is told only that, and the request
    id to quote (OpenAI's own 500s say the same); what went wrong is in the log, under that
    id, never in the response."""

    status = 500
    code = "internal_error"

    def __init__(self, request_id: str | None) -> None:
        said = f" (request id {request_id})" if request_id else ""
        super().__init__("Internal server error" + said)
        self.request_id = request_id


class ProviderError(GatewayError):
    """The upstream failed before the response was committed to the client.

    `upstream_status` and `upstream_detail` say what the provider itself answered (its
    HTTP status and its redacted, bounded message). They are for the operator: recorded
    on the usage row and in the log, never sent to the client.
    """

    status = 502
    code = "provider_error"
    message = "LLM provider error"
    upstream_status: int | None = None
    upstream_detail: str = ""

    def upstream(self, status: int | None, detail: str) -> ProviderError:
        self.upstream_status, self.upstream_detail = status, detail
        return self


class ProviderTimeout(ProviderError):
    status = 504
    code = "provider_timeout"
    message = "The LLM provider timed out"


class ProviderUnreachable(ProviderError):
    code = "provider_unreachable"
    message = "LLM provider error: could not connect"


class ProviderCredentialsRejected(ProviderError):
    code = "provider_auth_error"
    message = "The provider rejected the gateway's credentials"


class ProviderRejectedRequest(ProviderError):
    status = 400
    code = "provider_invalid_request"


class ProviderNotFound(ProviderError):
    status = 404
    code = "provider_not_found"


class ProviderRateLimited(ProviderError):
    status = 429
    code = "provider_rate_limited"
    message = "The LLM provider is rate limiting requests; retry later"


# --- Redaction -----------------------------------------------------------------------------

_MAX_MESSAGE_CHARS = 400
_REDACTIONS = (
    # URLs (they can carry hosts, paths and query tokens).
    re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE),
    # Bearer credentials and anything shaped like an API key or token.
    re.compile(r"\bBearer\s+\S+", re.IGNORECASE),
    re.compile(r"\b(?:sk|pk|gw|otari-mk|key|tok|rk)[-_][A-Za-z0-9_\-]{6,}", re.IGNORECASE),
    # Long unbroken secrets without a known prefix.
    re.compile(r"\b[A-Za-z0-9_\-]{32,}\b"),
)


def redact(message: str, *, secrets: list[str] = (), echoes: list[str] = ()) -> str:
    """Make a provider's error message safe to show the caller: no keys, tokens or URLs,
    no echo of the prompt (`echoes`: the request's texts), at most 400 characters."""
    for secret in secrets:
        if secret:
            message = message.replace(secret, "[redacted]")
    for text in echoes:
        # Only texts long enough to be worth hiding and unlikely to be common words.
        if len(text) >= 12:
            message = message.replace(text, "[prompt]")
    for pattern in _REDACTIONS:
        message = pattern.sub("[redacted]", message)
    message = " ".join(message.split())
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
    return message or "The provider rejected the request"


def provider_error_message(body: bytes) -> str:
    """The human message in an upstream error body of either wire shape."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(parsed.get("message"), str):
            return parsed["message"]
    return ""


def provider_error_for_status(
    status: int,
    body: bytes,
    *,
    retry_after: str | None,
    secrets: list[str],
    echoes: list[str],
) -> ProviderError:
    """Map an upstream error status to what the caller sees (docs/SPEC.md §2), keeping the
    provider's own status and redacted message for the operator."""
    said = provider_error_message(body)
    message = redact(said, secrets=secrets, echoes=echoes)
    # For the operator, also what a body that is not an API error says (a proxy's HTML
    # page, plain text): its start, redacted like the rest.
    raw = said or body[:_MAX_MESSAGE_CHARS].decode("utf-8", "replace")
    detail = redact(raw, secrets=secrets, echoes=echoes) if raw.strip() else ""
    if status in (400, 422):
        error: ProviderError = ProviderRejectedRequest(message)
    elif status == 404:
        error = ProviderNotFound(message or "The provider does not know this model")
    elif status == 429:
        error = ProviderRateLimited(headers={"Retry-After": retry_after} if retry_after else {})
    elif status in (401, 403):
        error = ProviderCredentialsRejected()
    else:
        error = ProviderError()
    return error.upstream(status, detail)


# --- Rendering -----------------------------------------------------------------------------

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def error_body(exc: GatewayError, style: ErrorStyle) -> dict:
    """The API's own error shape, plus a top-level `detail` string: the `otari` SDK and
    otari-cli read `detail` (the management API's shape) and would otherwise print the
    `error` object as Python dict text. The OpenAI and Anthropic SDKs ignore it."""
    if style == "anthropic":
        error_type = _ANTHROPIC_TYPES.get(exc.status, "api_error")
        body = {
            "type": "error",
            "error": {"type": error_type, "message": exc.message},
            "detail": exc.message,
        }
        if isinstance(exc, InternalError) and exc.request_id:
            # Where Anthropic's own error bodies carry it.
            body["request_id"] = exc.request_id
        return body
    fallback = "server_error" if exc.status >= 500 else "api_error"
    error_type = _OPENAI_TYPES.get(exc.status, fallback)
    return {
        "error": {
            "message": exc.message,
            "type": error_type,
            "param": exc.param,
            "code": exc.code,
        },
        "detail": exc.message,
    }


# The generation routes (otari/asgi.py serves them without Django's middleware), and the
# one among them that speaks Anthropic's wire format.
_GENERATION_PATHS = re.compile(
    r"^/(?:api/)?v1/(?:chat/completions|messages|responses|embeddings|models)(?:/|$)"
)
_ANTHROPIC_PATHS = re.compile(r"^/(?:api/)?v1/messages(?:/|$)")
# Every route that answers JSON: the generation and management APIs, health, metrics and
# the OpenAPI document. The rest (the console, the home page, /docs) are HTML pages.
_API_PATHS = re.compile(r"^/(?:(?:api/)?v1/|health(?:/|$)|metrics/?$|openapi\.json$)")


def error_body_for_path(exc: GatewayError, path: str) -> dict | None:
    """`error_body` in the shape of the generation API at `path`; None for any other
    path. The allowed-hosts middleware (common/hosts.py) refuses requests before they
    reach a view, and answers generation routes in their own shape through this."""
    if not _GENERATION_PATHS.match(path):
        return None
    return error_body(exc, "anthropic" if _ANTHROPIC_PATHS.match(path) else "openai")


def server_error_body(path: str, request_id: str | None) -> dict | None:
    """The body of a 500 on an API route, in the shape of the API at `path`: a generation
    API's own, else the management API's `{"detail": ...}`; None for an HTML page."""
    exc = InternalError(request_id)
    body = error_body_for_path(exc, path)
    if body is None and _API_PATHS.match(path):
        body = {"detail": exc.message}
    return body


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500 (otari/urls.py): an exception no view handled, on any route and through
    either Django handler (otari/asgi.py). API routes answer JSON in their API's shape,
    the console Django's HTML page. Django has already logged the traceback, once, with
    the request id (django.request, "Internal Server Error: <path>"); the response never
    carries the exception's text."""
    ctx = current_request()  # None only outside the ASGI application (tests' WSGI client)
    body = server_error_body(request.path_info, ctx.request_id if ctx is not None else None)
    if body is None:
        return defaults.server_error(request)
    return _json_response(body, 500)


def error_response(
    exc: GatewayError, style: ErrorStyle, headers: dict[str, str] | None = None
) -> HttpResponse:
    return _json_response(error_body(exc, style), exc.status, {**exc.headers, **(headers or {})})


def _json_response(body: dict, status: int, headers: dict[str, str] | None = None) -> HttpResponse:
    content = json.dumps(body).encode()
    response = HttpResponse(content, status=status, content_type="application/json")
    # Set here because generation routes run without CommonMiddleware (otari/asgi.py).
    response["Content-Length"] = str(len(content))
    for name, value in (headers or {}).items():
        response[name] = value
    return response
