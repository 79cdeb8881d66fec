"""The provider call, up to and including its commit point.

The commit point is the moment after which the client has (or is about to have) part
of an answer, so the request can no longer be moved to another attempt or refunded:

- an answer that is not streamed commits when the whole answer has been read and
  translated: until then nothing reached the client;
- a stream commits when its first bytes have arrived and are not an error: that is
  what the response's 200 promises. Opening the connection is not enough, since a
  provider may accept it and then send nothing, or a 200 whose stream opens with an
  error (docs/SPEC.md §4).

Every failure before the commit point is a `GatewayError` handed to `_fail`: in platform
mode the next attempt is tried; otherwise the hold is refunded in full and the failure
becomes an ordinary HTTP error. After the commit point the exchange is settled: here
for a whole answer, by the relay (llm_proxy.pipeline.relay) for a stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from django.http import HttpResponse

from common.exceptions import GatewayError
from llm_proxy import upstream
from llm_proxy.errors import (
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    provider_error_message,
    redact,
)
from llm_proxy.pipeline import relay
from llm_proxy.pipeline.naming import renamed
from llm_proxy.pipeline.sse import EventSplitter
from llm_proxy.translate import TranslationError
from otari import metrics

if TYPE_CHECKING:
    from llm_proxy.pipeline.exchange import Exchange
    from usage.pricing import TokenUsage

logger = logging.getLogger(__name__)


async def complete(exchange: Exchange) -> HttpResponse:
    """A non-streaming request: call (each attempt in turn, in platform mode), settle,
    answer."""
    while True:
        answer = await _answer(exchange)
        if isinstance(answer, _Answer):
            break
        failed = await _fail(exchange, answer)
        if failed is not None:
            return failed
    await exchange.served()
    await exchange.settle_complete(answer.usage, answer.output_chars)
    content = answer.content
    if exchange.policy is not None:
        content = renamed(content, exchange.policy)
    result = HttpResponse(content, content_type="application/json")
    result["Content-Length"] = str(len(content))
    result["X-Otari-Request-Id"] = str(exchange.request_id)
    if exchange.charged_usd is not None:
        result["X-Otari-Cost-Usd"] = str(exchange.charged_usd)
    for name, value in exchange.response_headers().items():
        result[name] = value
    return result


async def stream(exchange: Exchange) -> HttpResponse:
    """A streaming request: open the upstream stream and wait for its first bytes before
    committing, so that anything failing until then is an ordinary HTTP error with a
    full refund (docs/SPEC.md §4), or, in platform mode, a move to the next attempt."""
    while True:
        opened = await _stream_open(exchange)
        if not isinstance(opened, GatewayError):
            break
        failed = await _fail(exchange, opened)
        if failed is not None:
            return failed
    # Committed: from here on the relay settles the exchange, however the stream ends.
    await exchange.served()
    response, chunks, first_chunk = opened
    return relay.event_stream_response(exchange, response, chunks, first_chunk)


@dataclass(frozen=True, slots=True)
class _Answer:
    content: bytes  # in the client's API
    usage: TokenUsage | None
    output_chars: int


async def _answer(exchange: Exchange) -> _Answer | GatewayError:
    """Send the current attempt and read its whole answer, in the client's API; or
    the failure, before anything was charged or sent."""
    route = exchange.target.route
    client = upstream.client()
    request = await _upstream_request(exchange, client, stream=False)
    if isinstance(request, ProviderError):
        return request
    try:
        response = await client.send(request)
    except httpx.HTTPError as exc:
        return _provider_failure(exc, exchange)
    metrics.provider_call_ended()
    if response.status_code >= 400:
        return await _provider_status_error(exchange, response)
    try:
        parsed = json.loads(response.content)
        if not isinstance(parsed, dict):
            raise ValueError("not an object")
    except ValueError:
        return ProviderError("LLM provider error: the response was not valid JSON")
    content = response.content
    if route.translated:
        try:
            content = json.dumps(
                route.response_body(exchange.body, parsed, exchange.model)
            ).encode()
        except TranslationError as exc:
            # Nothing reached the client: like any provider fault before the answer,
            # a full refund (the usage row says what could not be translated).
            return ProviderError(f"LLM provider error: the answer had {exc}")
    return _Answer(
        content=content,
        usage=route.upstream.usage_from_body(parsed),
        output_chars=route.upstream.output_chars_from_body(parsed),
    )


async def _stream_open(
    exchange: Exchange,
) -> tuple[httpx.Response, AsyncIterator[bytes], bytes] | GatewayError:
    """Open the current attempt's upstream stream and read its first bytes: the commit
    point. Returns the failure when anything goes wrong until then."""
    route = exchange.target.route
    client = upstream.client()
    request = await _upstream_request(exchange, client, stream=True)
    if isinstance(request, ProviderError):
        return request
    response: httpx.Response | None = None
    try:
        response = await client.send(request, stream=True)
        if response.status_code >= 400:
            failure = await _provider_status_error(exchange, response)
            await response.aclose()
            return failure
        chunks = exchange.provider.stream_chunks(response)
        first_chunk = await anext(chunks)
        first_events = EventSplitter().feed(first_chunk)
        if first_events and route.upstream.is_stream_error(first_events[0]):
            # A 200 whose stream opens with an error (OpenRouter and other servers report
            # failures so): nothing was generated, so it is a failure before the commit,
            # refunded (or, in platform mode, the next attempt's turn).
            await response.aclose()
            failure = ProviderError("LLM provider error: the stream began with an error")
            said = redact(
                provider_error_message(first_events[0].data)
                or first_events[0].data.decode("utf-8", "replace"),
                secrets=exchange.provider.secrets(),
            )
            return failure.upstream(response.status_code, said)
    except (httpx.HTTPError, StopAsyncIteration) as exc:
        if response is not None:
            await response.aclose()
        return (
            _provider_failure(exc, exchange)
            if isinstance(exc, httpx.HTTPError)
            else ProviderError("LLM provider error: the stream ended before any data")
        )
    except BaseException:
        # Cancelled while the stream was being opened (the client gave up): nothing was
        # delivered, so nothing is charged.
        if response is not None:
            await response.aclose()
        raise
    return response, chunks, first_chunk


async def _upstream_request(
    exchange: Exchange, client: httpx.AsyncClient, *, stream: bool
) -> httpx.Request | ProviderError:
    """The current attempt's HTTP request, or why none could be made (no credentials).

    Counted as a started provider call either way: a failure to build the request ends
    like any other provider failure.
    """
    target = exchange.target
    metrics.provider_call_started()
    try:
        return await exchange.provider.upstream_request(
            client,
            target.route.upstream.name,
            target.body,
            target.headers,
            model=exchange.model,
            stream=stream,
        )
    except ProviderError as exc:
        return exc


def _provider_failure(exc: httpx.HTTPError, exchange: Exchange) -> ProviderError:
    if isinstance(exc, httpx.TimeoutException):
        failure: ProviderError = ProviderTimeout()
    elif isinstance(exc, httpx.ConnectError):
        failure = ProviderUnreachable()
    else:
        failure = ProviderError()
    # No status: what went wrong on the wire, for the operator (httpx names the error;
    # its text can carry the URL, which redaction removes).
    detail = redact(f"{type(exc).__name__}: {exc}", secrets=exchange.provider.secrets())
    return failure.upstream(None, detail)


async def _provider_status_error(exchange: Exchange, response: httpx.Response) -> ProviderError:
    content = await response.aread()
    return exchange.provider.upstream_error(
        response.status_code, response.headers, content, echoes=exchange.prompt_texts
    )


async def _fail(exchange: Exchange, failure: GatewayError) -> HttpResponse | None:
    """An attempt failed before the commit point. Returns None when there is another
    attempt to try (platform mode); otherwise closes the request with a refund and
    returns the last failure's error response."""
    metrics.provider_error_observed(provider=exchange.attempt.provider_name, failure=failure)
    if isinstance(failure, ProviderError):
        # The cause, which the client is not shown: the provider's status and words.
        logger.warning(
            "request %s: provider %s failed: %s (upstream status %s: %s)",
            exchange.request_id,
            exchange.attempt.provider_name,
            failure.code,
            failure.upstream_status if failure.upstream_status is not None else "none",
            failure.upstream_detail or "no message",
        )
    if await exchange.advance(failure):
        logger.info(
            "request %s: attempt failed (%s), trying the next one",
            exchange.request_id,
            failure.code,
        )
        return None
    failure = exchange.final_failure
    await exchange.refund(failure)
    return exchange.error_response(failure)
