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
from llm_proxy.pipeline.sse import IncompleteStream, with_summary

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
    reader = UpstreamReader(chunks, keepalive_s)
    try:
        try:
            out = codec.feed(first_chunk)
            if out:
                yield out
            while not codec.finished:
                chunk = await reader.read()
                if chunk is None:
                    break
                out = codec.keepalive if chunk is KEEPALIVE_TICK else codec.feed(chunk)
                if out:
                    yield out
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
        await reader.aclose()
        await upstream.aclose()


class _Tick:
    """Marker: the provider has been silent for the keepalive interval."""


KEEPALIVE_TICK = _Tick()

# Bytes read ahead of the client at most: past this the reader waits for the relay.
READ_AHEAD_BYTES = 256 * 1024


class UpstreamReader:
    """Reads the upstream's chunks in a task of its own, for the relay.

    - Keepalives: the relay waits for data with a timer, and a tick of the timer never
      cancels the pending read (that would break the upstream stream).
    - Chunks that arrived together go out together: the reader takes every chunk
      already received before the relay runs again, so a burst of events (a provider
      that sends faster than the network delivers, or several events per packet) costs
      the relay one pass of the codec and the client one write, not one per event. The
      first chunk still goes out alone and at once, and a chunk is never held back
      waiting for another.
    """

    def __init__(self, chunks: AsyncIterator[bytes], keepalive_s: float) -> None:
        self._chunks = chunks
        self._keepalive_s = keepalive_s
        self._loop = asyncio.get_running_loop()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._error: Exception | None = None
        self._ended = False
        # The relay waiting for data, and the reader waiting for the relay to take some.
        self._waiter: asyncio.Future | None = None
        self._room: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        try:
            async for chunk in self._chunks:
                self._buffer.append(chunk)
                self._buffered += len(chunk)
                self._wake()
                if self._buffered >= READ_AHEAD_BYTES:
                    self._room = self._loop.create_future()
                    await self._room
        except Exception as exc:
            self._error = exc
        finally:
            self._ended = True
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes | _Tick | None:
        """What arrived since the last read, all of it, waiting for it if need be;
        KEEPALIVE_TICK when the provider stayed silent for the keepalive interval; None
        at the end of the stream. A failed read raises here."""
        if self._task is None:
            self._task = self._loop.create_task(self._run())
        if not self._buffer and not self._ended:
            waiter = self._waiter = self._loop.create_future()
            timer = (
                self._loop.call_later(self._keepalive_s, _tick, waiter)
                if self._keepalive_s > 0
                else None
            )
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if waiter.result() is KEEPALIVE_TICK:
                return KEEPALIVE_TICK
        if self._buffer:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            if self._room is not None and not self._room.done():
                self._room.set_result(None)
            return data
        if self._error is not None:
            raise self._error
        return None

    async def aclose(self) -> None:
        """Stop reading (the relay is done, or the client went away)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            # Waited for, so that the upstream is closed after the read let go of it;
            # asyncio.wait, unlike awaiting the task, lets a cancellation of our own through.
            await asyncio.wait({task})


def _tick(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(KEEPALIVE_TICK)
