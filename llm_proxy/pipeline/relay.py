"""The relay: a committed stream, forwarded to the client while the books are kept.

The relay forwards events as they arrive. What each API's events mean (where its usage
is, which event is terminal, what an error looks like) is a `StreamCodec`'s business
(llm_proxy/formats/, llm_proxy/translate/). The relay only decides *when* the money
moves, through the exchange (llm_proxy.pipeline.exchange):

- before the terminal event goes out: settle, then send it (SDKs stop reading at the
  terminal event and hang up, so settling afterwards would race the disconnect);
- when the upstream breaks mid-stream: charge what was delivered, send an error event;
- when the client goes away: charge what was delivered, close the upstream, re-raise.

Settlement is shielded from cancellation (`Exchange._close_once`), because Django
cancels the response task the moment the client disconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
from django.conf import settings
from django.http import StreamingHttpResponse

from llm_proxy.pipeline.naming import RenamingCodec
from llm_proxy.pipeline.sse import EventSplitter, IncompleteStream, SSEEvent, with_summary

if TYPE_CHECKING:
    from llm_proxy.pipeline.exchange import Exchange
    from llm_proxy.pipeline.sse import StreamCodec

logger = logging.getLogger(__name__)


class EventStreamResponse(StreamingHttpResponse):
    """A streaming response whose body Django iterates directly.

    StreamingHttpResponse wraps async content in two generators of its own; when the
    client disconnects Django closes only the outer one, and ours would learn of it only
    when garbage-collected. Iterating ours directly delivers the close at once, so the
    relay settles and closes the upstream connection right away.
    """

    def __aiter__(self):
        return self._iterator


def event_stream_response(
    exchange: Exchange,
    upstream: httpx.Response,
    chunks: AsyncIterator[bytes],
    first_chunk: bytes,
) -> EventStreamResponse:
    """The response of a committed stream: its headers, and the relay as its body."""
    result = EventStreamResponse(
        relay(
            exchange=exchange,
            upstream=upstream,
            chunks=chunks,
            first_chunk=first_chunk,
            codec=_codec(exchange),
            keepalive_s=settings.OTARI_STREAM_KEEPALIVE_SECONDS,
        ),
        content_type="text/event-stream",
    )
    result["Cache-Control"] = "no-cache"
    result["X-Accel-Buffering"] = "no"
    result["X-Otari-Request-Id"] = str(exchange.request_id)
    for name, value in exchange.response_headers().items():
        result[name] = value
    return result


def _codec(exchange: Exchange) -> StreamCodec:
    codec = exchange.target.route.stream_codec(exchange.body, exchange.model)
    if exchange.policy is not None:
        return RenamingCodec(codec, exchange.policy)
    return codec


async def relay(
    *,
    exchange: Exchange,
    upstream: httpx.Response,
    chunks: AsyncIterator[bytes],
    first_chunk: bytes,
    codec: StreamCodec,
    keepalive_s: float,
) -> AsyncIterator[bytes]:
    """The response body of a committed stream. See the module docstring."""
    splitter = EventSplitter()
    garbage = _GarbageFilter(exchange)
    try:
        try:
            out = b"".join(codec.transform(e) for e in garbage.drop(splitter.feed(first_chunk)))
            if out:
                yield out
            if not codec.finished:
                async for chunk in with_keepalive(chunks, keepalive_s):
                    if chunk is KEEPALIVE_TICK:
                        yield codec.keepalive
                        continue
                    out = b"".join(codec.transform(e) for e in garbage.drop(splitter.feed(chunk)))
                    if out:
                        yield out
                    if codec.finished:
                        break
            if not codec.complete:
                raise IncompleteStream
        except Exception as exc:
            # A broken upstream (httpx errors, IncompleteStream) or a bug of ours: either
            # way the client has part of an answer, and that part is charged.
            if not isinstance(exc, httpx.HTTPError | IncompleteStream):
                logger.exception("request %s: relay failed", exchange.request_id)
            logger.warning(
                "request %s: upstream stream broke: %s", exchange.request_id, type(exc).__name__
            )
            await exchange.settle_broken_stream(codec)
            yield codec.error_event()
            return
        await exchange.settle_stream(codec)
        if exchange.spooled:
            # The database went away: the stream ends with the API's error event (its
            # charge is kept and recorded when the database returns).
            yield codec.error_event()
            return
        yield with_summary(codec.closing(), exchange.closing_summary())
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away. Charge what it was sent; the upstream is closed below.
        await exchange.settle_disconnected(codec)
        raise
    finally:
        await upstream.aclose()


class _GarbageFilter:
    """Drops the upstream's events that are no event of any API relayed: every one
    carries a JSON object (chat's `[DONE]` aside). A broken server or proxy can send
    anything (broken JSON, bytes that are not UTF-8, lines with no field); passed through,
    they would break the client's SDK mid-answer. Checked by shape, not parsed: the relay
    parses only the events that carry usage (the hot path)."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.dropped = 0

    def drop(self, events: list[SSEEvent]) -> list[SSEEvent]:
        kept = [event for event in events if _well_formed(event.data)]
        if len(kept) < len(events):
            if not self.dropped:
                logger.warning(
                    "request %s: the provider sent data that is no event; dropped",
                    self.exchange.request_id,
                )
            self.dropped += len(events) - len(kept)
        return kept


def _well_formed(data: bytes) -> bool:
    if data == b"[DONE]":
        return True
    if data[:1] != b"{" or data.rstrip()[-1:] != b"}":
        return False
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class _Tick:
    """Marker: the provider has been silent for the keepalive interval."""


KEEPALIVE_TICK = _Tick()


async def with_keepalive(
    chunks: AsyncIterator[bytes], interval_s: float
) -> AsyncIterator[bytes | _Tick]:
    """Yield the upstream's chunks, and a tick whenever it is silent for `interval_s`.

    The pending read is never cancelled by a tick (that would break the upstream
    stream); it is awaited again. Interval 0 turns keepalives off.
    """
    if interval_s <= 0:
        async for chunk in chunks:
            yield chunk
        return
    while True:
        step = asyncio.ensure_future(anext(chunks))
        try:
            while not (await asyncio.wait({step}, timeout=interval_s))[0]:
                yield KEEPALIVE_TICK
        finally:
            if not step.done():
                step.cancel()
        try:
            yield step.result()
        except StopAsyncIteration:
            return
