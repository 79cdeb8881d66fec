"""Prometheus metrics, `GET /metrics`, and the ASGI middleware that times every request.

Enabled by OTARI_ENABLE_METRICS; off, nothing is recorded and /metrics is a 404. The
metric list, with labels and meanings, is in docs/OBSERVABILITY.md.

Several worker processes: with PROMETHEUS_MULTIPROC_DIR set (to a directory emptied
before the server starts), prometheus-client keeps each process's values in files of
that directory and a scrape of any process returns the sum over all of them. Without
it, each process reports only its own counts (right for a single process).

Per-request cost is kept small: label sets are few and bounded (route templates, never
raw paths), and the gauges that need the database (open holds, reserved money, the
outbox) are computed at scrape time, not maintained per request.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import glob
import hmac
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from otari import logging as otari_logging

if TYPE_CHECKING:
    from common.exceptions import GatewayError
    from usage.ledger import UsageRecord

logger = logging.getLogger(__name__)

MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")

# Our metrics live in their own registry: in multiprocess mode the scrape reads the
# files instead, and the library's default registry stays free for other code.
_registry = CollectorRegistry()

# LLM calls take from milliseconds to minutes.
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The gateway's own share is meant to be around a millisecond.
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(
    "otari_http_requests",
    "HTTP requests served, by route template, method and status code.",
    ["endpoint", "method", "status"],
    registry=_registry,
)
DURATION = Histogram(
    "otari_http_request_duration_seconds",
    "Time from the request's arrival to its last byte (streams: the end of the stream).",
    ["endpoint"],
    buckets=_DURATION_BUCKETS,
    registry=_registry,
)
IN_FLIGHT = Gauge(
    "otari_http_requests_in_flight",
    "HTTP requests being served (streams until their last byte).",
    registry=_registry,
    multiprocess_mode="livesum",
)
OVERHEAD = Histogram(
    "otari_gateway_overhead_seconds",
    "Time a generation request spent in the gateway, not waiting on the provider.",
    ["endpoint"],
    buckets=_OVERHEAD_BUCKETS,
    registry=_registry,
)
TOKENS = Counter(
    "otari_tokens",
    "Tokens of settled requests, by provider, model and type "
    "(input, output, cache_read, cache_write).",
    ["provider", "model", "type"],
    registry=_registry,
)
COST = Counter(
    "otari_cost_usd",
    "Cost of settled requests in USD, as written to their usage rows.",
    ["provider", "model"],
    registry=_registry,
)
BUDGET_REJECTIONS = Counter(
    "otari_budget_rejections",
    "Generation requests refused because the user's budget was exhausted.",
    registry=_registry,
)
RATE_LIMIT_REJECTIONS = Counter(
    "otari_rate_limit_rejections",
    "Generation requests refused by a rate limit, by scope (user, key) and limit (rpm, tpm).",
    ["scope", "limit"],
    registry=_registry,
)
AUTH_FAILURES = Counter(
    "otari_auth_failures",
    "Generation requests refused with 401, by reason.",
    ["reason"],
    registry=_registry,
)
PROVIDER_ERRORS = Counter(
    "otari_provider_errors",
    "Failed provider calls, by provider and class "
    "(provider_timeout, provider_unreachable, provider_error, provider_rate_limited, ...).",
    ["provider", "error_class"],
    registry=_registry,
)
RATELIMIT_BACKEND_ERRORS = Counter(
    "otari_ratelimit_backend_errors",
    "Rate-limit checks that could not reach Redis (the request was let through).",
    registry=_registry,
)

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
STATUS_CLIENT_CLOSED = 499


def enabled() -> bool:
    return settings.OTARI_ENABLE_METRICS


def _one_of_several_workers() -> bool:
    """This process is one of several server workers: uvicorn starts each worker of
    `--workers N` (N > 1, default $WEB_CONCURRENCY) as a multiprocessing child."""
    if multiprocessing.parent_process() is not None:
        return True
    try:
        return int(os.environ.get("WEB_CONCURRENCY", "1")) > 1
    except ValueError:
        return False


def warn_if_per_process() -> None:
    """At server startup: say so loudly when each scrape would see one worker of several.

    A warning, not a refusal to start: uvicorn restarts a worker that dies, so a worker
    that refused would only fill the log with restarts while serving nothing.
    """
    if enabled() and not MULTIPROCESS_DIR and _one_of_several_workers():
        logger.warning(
            "Metrics are WRONG: several worker processes serve this gateway and "
            "PROMETHEUS_MULTIPROC_DIR is not set, so each scrape of /metrics returns the "
            "counts of whichever single worker answers it. Set PROMETHEUS_MULTIPROC_DIR "
            "to a directory emptied before the server starts (docs/OBSERVABILITY.md), "
            "or run one worker."
        )


_UNGUARDED_DETAIL = (
    "/metrics requires OTARI_METRICS_TOKEN (scrapers send Authorization: Bearer <token>); "
    "OTARI_METRICS_PUBLIC=true serves it without one"
)


def warn_if_unguarded() -> None:
    """At server startup: say so loudly when /metrics refuses every scrape (no token), or
    serves anyone who reaches it (the operator's opt-out)."""
    if not enabled() or settings.OTARI_METRICS_TOKEN:
        return
    if settings.OTARI_METRICS_PUBLIC:
        logger.warning(
            "Metrics are PUBLIC: OTARI_METRICS_PUBLIC=true and no OTARI_METRICS_TOKEN, so "
            "anyone who can reach /metrics reads the gateway's traffic and money. Set "
            "OTARI_METRICS_TOKEN unless only a trusted network reaches it."
        )
    else:
        logger.warning("Metrics are on but every scrape is refused (403): %s.", _UNGUARDED_DETAIL)


# `metric.labels(...)` validates and looks up its labels on every call, the larger part of
# the per-request cost; the label sets are few (bounded), so their children are kept.
_children: dict[tuple, Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    child = _children.get((metric, labels))
    if child is None:
        child = _children[(metric, labels)] = metric.labels(*labels)
    return child


# --- recording ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def route_of(path: str) -> str:
    """The route template a path resolves to, e.g. `/v1/users/<str:user_id>`: a bounded
    label, whatever the path. `/api/v1/...` is the same endpoint as `/v1/...`."""
    try:
        match = resolve(path)
    except Resolver404:
        return "unmatched"
    return "/" + match.route.removeprefix("api/")


def request_observed(ctx: otari_logging.RequestContext, status: int, duration_s: float) -> None:
    endpoint = ctx.endpoint or route_of(ctx.path)
    method = ctx.method if ctx.method in _METHODS else "other"
    _child(REQUESTS, endpoint, method, str(status)).inc()
    _child(DURATION, endpoint).observe(duration_s)
    overhead = ctx.overhead_s()
    if overhead is not None:
        _child(OVERHEAD, endpoint).observe(overhead)


def request_closed(record: UsageRecord) -> None:
    """A generation request's usage row is written: count its tokens and cost, and note
    who and what for its access log line."""
    ctx = otari_logging.current()
    if ctx is not None:
        ctx.user_id = record.user_id
        ctx.api_key_id = str(record.api_key_id) if record.api_key_id else None
        ctx.model = f"{record.provider}:{record.model}" if record.provider else record.model
        if record.usage is not None:
            ctx.prompt_tokens = record.usage.prompt_tokens
            ctx.completion_tokens = record.usage.output_tokens
        if record.cost_usd is not None:
            ctx.cost_usd = str(record.cost_usd)
    if not enabled():
        return
    usage = record.usage
    if usage is not None:
        for kind, count in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
        ):
            if count:
                _child(TOKENS, record.provider, record.model, kind).inc(count)
    if record.cost_usd:
        _child(COST, record.provider, record.model).inc(float(record.cost_usd))


def provider_error_observed(*, provider: str, failure: GatewayError | str) -> None:
    """A provider call failed: before the commit point (each attempt that failed, with
    its error's code), or after it (`stream_broken`)."""
    if enabled():
        error_class = failure if isinstance(failure, str) else failure.code
        _child(PROVIDER_ERRORS, provider, error_class).inc()


def refusal_observed(exc: GatewayError) -> None:
    """A generation request was refused before reaching the provider."""
    if not enabled():
        return
    if exc.status == 401:
        _child(AUTH_FAILURES, exc.code).inc()
    elif exc.code == "budget_exceeded":
        BUDGET_REJECTIONS.inc()
    elif exc.code == "rate_limit_exceeded":
        _child(
            RATE_LIMIT_REJECTIONS, getattr(exc, "scope", "user"), getattr(exc, "limit", "rpm")
        ).inc()


def ratelimit_backend_error_observed() -> None:
    if enabled():
        RATELIMIT_BACKEND_ERRORS.inc()


# --- provider wait (what the overhead excludes) ------------------------------------------


def provider_call_started() -> None:
    """The upstream call begins (the first attempt, if there are several)."""
    ctx = otari_logging.current()
    if ctx is not None and ctx.provider_started is None:
        ctx.provider_started = time.perf_counter()


def provider_call_ended() -> None:
    """The provider has answered in full (or failed); later calls change nothing."""
    ctx = otari_logging.current()
    if ctx is not None and ctx.provider_started is not None and ctx.provider_ended is None:
        ctx.provider_ended = time.perf_counter()


# --- the ASGI middleware -----------------------------------------------------------------


class ObservabilityMiddleware:
    """Wraps the ASGI application: every HTTP request gets its log context; with metrics
    on it is counted and timed to its last byte; with the access log on, one line is
    written when it ends."""

    def __init__(
        self, app: Callable, *, error_body: Callable[[str, str], dict | None] | None = None
    ) -> None:
        self.app = app
        # The body of a 500 for a request path and id (llm_proxy.errors.server_error_body,
        # given by otari/asgi.py), for an exception that escaped the application itself.
        self.error_body = error_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        ctx, token = otari_logging.begin(scope["method"], path)
        metrics_on = settings.OTARI_ENABLE_METRICS
        if metrics_on:
            IN_FLIGHT.inc()
        status = 0

        async def send_watching_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                _ensure_request_id_header(message, ctx.request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_watching_status)
        except asyncio.CancelledError:
            status = status or STATUS_CLIENT_CLOSED
            raise
        except Exception:
            body = (
                None if status or self.error_body is None else self.error_body(path, ctx.request_id)
            )
            status = status or 500
            if body is None:
                raise
            # Django answers every exception raised in a view or its middleware itself
            # (handler500); this is one from around it (e.g. the allowed-hosts check)
            # before anything was sent: logged here, once, and answered like the others
            # rather than with the ASGI server's plain-text page.
            logger.exception("Unhandled error serving %s %s", scope["method"], path)
            await _send_json(send_watching_status, 500, body)
        finally:
            duration = time.perf_counter() - ctx.started
            # Nothing sent and no error: the client left before the response started.
            status = status or STATUS_CLIENT_CLOSED
            if metrics_on:
                IN_FLIGHT.dec()
                request_observed(ctx, status, duration)
            if settings.OTARI_ACCESS_LOG:
                otari_logging.log_access(ctx, status, duration)
            otari_logging.end(token)


async def _send_json(send: Callable, status: int, body: dict) -> None:
    content = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def _ensure_request_id_header(message: dict, request_id: str) -> None:
    """Every response carries its request id: generation responses set it themselves
    (the usage row's id); the others, and a 500 that Django made from an exception the
    handler did not catch, get it here. It is sent under both names: X-Otari-Request-Id,
    and Otari-Request-ID, the one the `otari` SDK reads."""
    headers = list(message.get("headers") or [])
    value = next((v for name, v in headers if name.lower() == b"x-otari-request-id"), None)
    if value is None:
        value = request_id.encode()
        headers.append((b"x-otari-request-id", value))
    headers.append((b"otari-request-id", value))
    message["headers"] = headers


# --- scrape-time gauges ------------------------------------------------------------------


class _DatabaseCollector(Collector):
    """Gauges read from the database when scraped: the ledger's open money, the outbox."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from django.utils import timezone

        from budgets.selectors import holds_open_summary, users_reserved_total
        from usage.selectors import usage_reports_outbox_counts

        try:
            holds = holds_open_summary(now=timezone.now())
            reserved = users_reserved_total()
        except Exception:
            logger.warning("metrics: could not read the open holds", exc_info=True)
        else:
            yield GaugeMetricFamily("otari_open_holds", "Holds currently open.", value=holds.count)
            yield GaugeMetricFamily(
                "otari_open_holds_usd",
                "Sum of the open holds' amounts, USD.",
                value=float(holds.amount_usd),
            )
            yield GaugeMetricFamily(
                "otari_stale_holds",
                "Open holds past their expiry, waiting for the sweeper.",
                value=holds.stale_count,
            )
            yield GaugeMetricFamily(
                "otari_reserved_usd",
                "Sum of all users' reserved money, USD (equals otari_open_holds_usd).",
                value=float(reserved),
            )
        try:
            backlog, dead = usage_reports_outbox_counts()
        except Exception:
            logger.warning("metrics: could not read the outbox counts", exc_info=True)
        else:
            yield GaugeMetricFamily(
                "otari_outbox_backlog",
                "Platform usage reports not yet delivered (the outbox).",
                value=backlog,
            )
            yield GaugeMetricFamily(
                "otari_outbox_dead_letters",
                "Platform usage reports given up on (dead letters).",
                value=dead,
            )


_database_collector = _DatabaseCollector()

if MULTIPROCESS_DIR:
    os.makedirs(MULTIPROCESS_DIR, exist_ok=True)
    # The in-flight gauge of a process that has exited must stop counting (see also
    # _forget_dead_processes).
    atexit.register(multiprocess.mark_process_dead, os.getpid(), MULTIPROCESS_DIR)
else:
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        _registry.register(collector)
_registry.register(_database_collector)


def _forget_dead_processes() -> None:
    """Drop the in-flight gauge of worker processes that are gone.

    atexit is not enough: uvicorn's workers re-raise SIGTERM after a graceful shutdown
    and die of it, and a killed worker runs nothing at all. The directory belongs to
    one host, so a pid that no longer exists is a dead worker.
    """
    for path in glob.glob(os.path.join(MULTIPROCESS_DIR, "gauge_live*_*.db")):
        try:
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, MULTIPROCESS_DIR)
        except PermissionError:  # alive, run by another user
            continue


def _scrape_registry() -> CollectorRegistry:
    if not MULTIPROCESS_DIR:
        return _registry
    _forget_dead_processes()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    registry.register(_database_collector)
    return registry


def _authorized(request: HttpRequest) -> bool:
    token = settings.OTARI_METRICS_TOKEN
    if not token:
        return settings.OTARI_METRICS_PUBLIC
    presented = request.headers.get("Authorization", "").strip()
    if presented[:7].lower() != "bearer ":
        return False
    return hmac.compare_digest(presented[7:].strip().encode(), token.encode())


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """`GET /metrics`: Prometheus text (404 when metrics are off)."""
    if not settings.OTARI_ENABLE_METRICS:
        return JsonResponse({"detail": "Not found"}, status=404)
    if not settings.OTARI_METRICS_TOKEN and not settings.OTARI_METRICS_PUBLIC:
        # No token could be right: a 403 that says what the operator must set.
        return JsonResponse({"detail": _UNGUARDED_DETAIL}, status=403)
    if not _authorized(request):
        response = JsonResponse({"detail": "Invalid or missing metrics token"}, status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(_scrape_registry()), content_type=CONTENT_TYPE_LATEST)
