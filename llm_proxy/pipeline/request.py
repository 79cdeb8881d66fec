"""One generation request, start to end: admit, call the provider, answer.

    admission -> provider call -> (commit point) -> answer | relay -> exchange closes

Each phase is a module of this package:

- `admission`: the caller, the model and its price, the rate limits, the hold;
- `call`: the provider call up to its commit point, and failover before it;
- `relay`: a committed stream, forwarded event by event (`sse` parses and formats);
- `exchange`: the admitted request, closed exactly once (settle, refund, or a usage row
  alone), whichever way it ends.

This module wires them together and owns what spans them: cancellation (the client
leaving at any point) and the headers every generation response gets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from django.conf import settings

from common import pgpool
from common.exceptions import GatewayError, ServiceUnavailable
from llm_proxy import ratelimit
from llm_proxy.errors import InternalError, error_response
from llm_proxy.pipeline import admission, call, spool
from llm_proxy.pipeline.exchange import track
from otari import metrics
from otari.celery import embedded_beat_tick
from otari.logging import bind_request, log_payload
from otari.logging import current as current_request

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse

    from llm_proxy.formats.base import ApiFormat
    from llm_proxy.pipeline.exchange import Exchange

logger = logging.getLogger(__name__)


async def handle(request: HttpRequest, fmt: ApiFormat) -> HttpResponse:
    """Serve one generation request of API `fmt`."""
    request_id = bind_request(fmt.endpoint)
    started = time.perf_counter()
    embedded_beat_tick()
    spool.redrive_once()
    # Admission runs shielded: a hold taken by a statement whose caller was cancelled
    # (client gone) must still be seen, and released.
    admitting = track(admission.admit(request, fmt, request_id, started))
    try:
        exchange = await asyncio.shield(admitting)
    except (GatewayError, *pgpool.UNAVAILABLE) as raised:
        # The database being down is a 503 to retry, not an error of the gateway's.
        exc = raised if isinstance(raised, GatewayError) else ServiceUnavailable()
        metrics.refusal_observed(exc)
        exc.headers.setdefault("X-Otari-Request-Id", str(request_id))
        return _with_overhead(error_response(exc, fmt.error_style))
    except asyncio.CancelledError:
        track(_release_abandoned(admitting))
        raise
    if settings.OTARI_LOG_PAYLOADS:
        log_payload("request", exchange.body)
    try:
        if exchange.body.get("stream") is True:
            response = await call.stream(exchange)
        else:
            response = await call.complete(exchange)
    except asyncio.CancelledError:
        await exchange.refund_disconnected()
        raise
    except (ServiceUnavailable, *pgpool.UNAVAILABLE):
        # The database went away during the call: the hold cannot be closed now, and
        # the sweeper expires it once the database is back (docs/RELIABILITY.md).
        logger.warning("request %s: the database is unavailable", request_id)
        response = exchange.error_response(ServiceUnavailable())
    except Exception:
        logger.exception("request %s failed", request_id)
        failure = InternalError(str(request_id))
        await exchange.refund(failure)
        response = exchange.error_response(failure)
    return _finish(exchange, response)


async def _release_abandoned(admitting: asyncio.Task) -> None:
    """The client left during admission: once admission is done, release its hold."""
    try:
        exchange = await admitting
    except Exception:  # a refusal: already logged, nothing held
        return
    await exchange.refund_disconnected()


def _finish(exchange: Exchange, response: HttpResponse) -> HttpResponse:
    """Headers every generation response gets: X-RateLimit-* when the caller has limits,
    X-Otari-Overhead-Ms when the response is not a stream."""
    if exchange.rate is not None:
        for name, value in ratelimit.rate_headers(exchange.rate.windows).items():
            response[name] = value
    if not response.streaming:
        _with_overhead(response)
        if settings.OTARI_LOG_PAYLOADS:
            log_payload("response", response.content)
    return response


def _with_overhead(response: HttpResponse) -> HttpResponse:
    ctx = current_request()
    overhead = ctx.overhead_s() if ctx is not None else None
    if overhead is not None:
        response["X-Otari-Overhead-Ms"] = f"{overhead * 1000:.2f}"
    return response
