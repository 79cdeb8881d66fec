"""Request-scoped log context, structured log lines, and secret redaction.

Every HTTP request gets a `RequestContext` (created by the ASGI middleware in
otari/metrics.py, carried by a context variable into every task and thread the request
starts). The generation handler puts the request id in it (`bind_request`), and a log
record factory copies that id onto every record created while the request runs, so every
log line of the request carries it, whichever handler or formatter writes it.

Log lines never contain prompts, completions or secrets: the gateway does not log bodies
(unless OTARI_LOG_PAYLOADS is on, for debugging), and both formatters remove the
configured provider keys, the master key and anything shaped like a gateway key or a
bearer token from the finished line, tracebacks included.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# --- the request context ---------------------------------------------------------------


@dataclass(slots=True, eq=False)
class RequestContext:
    """What is known about the request being served; mutable, shared by its tasks."""

    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    # Every request has an id from its start, so that every line it logs carries it; a
    # generation request's id is also its usage row's (X-Otari-Request-Id).
    request_uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    request_id: str = ""
    # Set by the generation handler: the route, and when admission began.
    endpoint: str | None = None
    handle_started: float | None = None
    # Time spent waiting on the provider: from the upstream call to its last byte.
    provider_started: float | None = None
    provider_ended: float | None = None
    # Filled in when the request is closed, for the access log line.
    user_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: str | None = None

    def __post_init__(self) -> None:
        self.request_id = str(self.request_uuid)

    def provider_wait_s(self, now: float) -> float:
        if self.provider_started is None:
            return 0.0
        end = self.provider_ended if self.provider_ended is not None else now
        return end - self.provider_started

    def overhead_s(self) -> float | None:
        """Time the gateway spent on a generation request, not waiting on the provider:
        from the moment the handler had the request (body read) until now. None for
        requests the generation handler did not serve."""
        if self.handle_started is None:
            return None
        now = time.perf_counter()
        return max(0.0, now - self.handle_started - self.provider_wait_s(now))


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "otari_request", default=None
)


def current() -> RequestContext | None:
    return _current.get()


def begin(method: str, path: str) -> tuple[RequestContext, contextvars.Token]:
    """Start the context of a request (the ASGI middleware does this)."""
    ctx = RequestContext(method=method, path=path)
    return ctx, _current.set(ctx)


def end(token: contextvars.Token) -> None:
    _current.reset(token)


def bind_request(endpoint: str) -> uuid.UUID:
    """The id of the generation request being served (its usage row's id), noting its
    endpoint and when its handling began.

    Creates the context when no middleware did (a handler called directly).
    """
    ctx = _current.get()
    if ctx is None:
        ctx = RequestContext(method="POST", path=endpoint)
        _current.set(ctx)
    ctx.endpoint = endpoint
    ctx.handle_started = time.perf_counter()
    return ctx.request_uuid


# --- every record carries the request id -------------------------------------------------

_base_factory = logging.getLogRecordFactory()


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    ctx = _current.get()
    record.request_id = ctx.request_id if ctx is not None else None
    return record


def install_record_factory() -> None:
    """Make every log record carry `request_id` (None outside a request). Idempotent."""
    if logging.getLogRecordFactory() is not _record_factory:
        logging.setLogRecordFactory(_record_factory)


# --- redaction ---------------------------------------------------------------------------

# Anything shaped like a credential, whether or not this gateway issued it.
_SECRET_PATTERN = re.compile(
    r"\b(?i:bearer)\s+[^\s\"',]+"
    r"|\bgw-[A-Za-z0-9_\-]{16,}"
    r"|\botari-mk-[A-Za-z0-9_\-]+"
    r"|\b(?:sk|rk)-[A-Za-z0-9_\-]{16,}"
)
# Shorter configured values are left alone: replacing e.g. "test" would mangle lines
# without protecting anything.
_MIN_SECRET_CHARS = 8
_secrets_cache: tuple[tuple, list[str]] = ((), [])


def _configured_secrets() -> list[str]:
    """The secrets the gateway holds: provider keys, master key, tokens (cached until
    the configuration changes)."""
    global _secrets_cache
    try:
        from django.conf import settings

        from common.config import gateway_config

        config = gateway_config()
        key = (
            id(config),
            settings.OTARI_MASTER_KEY,
            settings.OTARI_PLATFORM_TOKEN,
            getattr(settings, "OTARI_METRICS_TOKEN", ""),
            settings.SECRET_KEY,
        )
        if key == _secrets_cache[0]:
            return _secrets_cache[1]
        values = [
            secret for provider in config.providers.values() for secret in provider.secret_values()
        ] + list(key[1:])
    except Exception:  # logging must work before, and without, a valid configuration
        return []
    secrets = [value for value in values if value and len(value) >= _MIN_SECRET_CHARS]
    _secrets_cache = (key, secrets)
    return secrets


def redact_secrets(text: str) -> str:
    """`text` without the gateway's secrets or anything shaped like a key or token."""
    for secret in _configured_secrets():
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return _SECRET_PATTERN.sub("[redacted]", text)


# --- formatters --------------------------------------------------------------------------

# Characters that could end a log line, forge the next one or rewrite a terminal: the C0
# controls (CR, LF, ESC...), DEL, the C1 controls (NEL...) and the Unicode line and
# paragraph separators. Anything logged may come from a client (the decoded path of a
# request without a key, a model name), so each is written as an escape instead.
_CONTROLS = (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)
_TEXT_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}
# In JSON the escape must be JSON's own; json.dumps already escapes the C0 controls.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _CONTROLS if c >= 0x20}


def escape_controls(text: str) -> str:
    """`text` on one line, its control characters written as `\\xNN` escapes."""
    return text.translate(_TEXT_ESCAPES)


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message`, secrets removed."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return redact_secrets(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The log line itself is escaped; a traceback, appended after it by format(),
        # keeps its own lines.
        return escape_controls(super().formatMessage(record))


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()
    | {"message", "asctime", "request_id", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, the record's
    `extra=` fields of plain types, and exc (the traceback). Secrets removed."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for name, value in vars(record).items():
            # Only plain values: objects given as `extra` (Django passes the whole
            # request, headers and all) are never serialised.
            if name not in _RECORD_ATTRS and isinstance(value, str | int | float | bool):
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(entry, default=str, ensure_ascii=False).translate(_JSON_ESCAPES)
        return redact_secrets(line)


# --- what the gateway itself logs --------------------------------------------------------

access_logger = logging.getLogger("otari.access")
payload_logger = logging.getLogger("otari.payloads")


def log_access(ctx: RequestContext, status: int, duration_s: float) -> None:
    """One line per HTTP request: what, how it ended, how long; never bodies."""
    overhead = ctx.overhead_s()
    extra: dict[str, Any] = {
        "method": ctx.method,
        "path": ctx.path,
        "status": status,
        "duration_ms": round(duration_s * 1000, 2),
    }
    if overhead is not None:
        extra["overhead_ms"] = round(overhead * 1000, 2)
    for name in (
        "user_id",
        "api_key_id",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ):
        value = getattr(ctx, name)
        if value is not None:
            extra[name] = value
    access_logger.info(
        "%s %s %s %.1fms", ctx.method, ctx.path, status, duration_s * 1000, extra=extra
    )


def log_payload(kind: str, content: bytes | str | dict) -> None:
    """Debugging only (OTARI_LOG_PAYLOADS): a request or response body, keys removed."""
    if isinstance(content, bytes):
        content = content.decode("utf-8", "replace")
    elif isinstance(content, dict):
        content = json.dumps(content, ensure_ascii=False)
    payload_logger.debug("%s body: %s", kind, content)
