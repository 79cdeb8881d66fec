"""The project's one exception hierarchy.

Each error carries an HTTP status, a machine code and a message that is safe to show a
caller. llm_proxy/errors.py renders them in the wire shape of the API that was called;
the management API renders `{"detail": message}`.
"""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"
    message: str = "Internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.headers = headers or {}
        super().__init__(self.message)


class BadRequest(GatewayError):
    status = 400
    code = "invalid_request"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "request_too_large"
    message = "Request body is too large"


class AuthenticationFailed(GatewayError):
    status = 401
    code = "invalid_api_key"
    message = "Invalid API key"


class PermissionDenied(GatewayError):
    status = 403
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class ServiceUnavailable(GatewayError):
    """A dependency the request needs is down (the database): retry shortly."""

    status = 503
    code = "service_unavailable"
    message = "The gateway's database is unavailable; retry shortly"

    def __init__(self, message: str | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", "1")
